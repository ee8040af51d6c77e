//! A minimal berth-images client for benchmarks: pulls one reference over the images socket and
//! prints the wall time and throughput (compressed bytes of the layers / wall time).
//!
//! `cargo run --release -p berth-images --example pull -- /run/berth/images.sock REF`

use std::collections::HashMap;
use std::time::Instant;

use berth_proto::berth::images::v1 as pb;
use berth_proto::berth::images::v1::images_client::ImagesClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(reference)) = (args.next(), args.next()) else {
        eprintln!("usage: pull SOCKET REFERENCE");
        std::process::exit(2);
    };
    let mut client = ImagesClient::new(berth_core::uds::channel(socket));
    let start = Instant::now();
    let mut stream = client
        .pull(pb::PullRequest {
            reference: reference.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut totals: HashMap<String, i64> = HashMap::new();
    let mut first_extract = None;
    let mut last_download = None;
    let mut done = None;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::pull_response::Event::Layer(l)) => {
                if l.total > 0 {
                    totals.insert(l.digest.clone(), l.total);
                }
                if l.phase == pb::PullLayerPhase::Extracting as i32 && first_extract.is_none() {
                    first_extract = Some(start.elapsed());
                }
                if l.phase == pb::PullLayerPhase::DownloadComplete as i32 {
                    last_download = Some(start.elapsed());
                }
            }
            Some(pb::pull_response::Event::Done(d)) => done = Some(d),
            _ => {}
        }
    }
    let wall = start.elapsed();
    let done = done.ok_or("the pull ended without PullDone")?;
    let bytes: i64 = totals.values().sum();
    let mb = bytes as f64 / 1e6;
    println!(
        "pulled {reference} ({}) image {}",
        done.digest,
        &done.image_id[..19.min(done.image_id.len())]
    );
    println!(
        "wall {:.3} s  layers {:.1} MB  {:.1} MB/s  (first extract at {:.3} s, last download done at {:.3} s)",
        wall.as_secs_f64(),
        mb,
        mb / wall.as_secs_f64(),
        first_extract.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        last_download.map(|d| d.as_secs_f64()).unwrap_or(0.0),
    );
    Ok(())
}
