//! The real seams over gRPC: berth-images, the snapshotter (any containerd-compatible one,
//! through [`RemoteSnapshotter`]), berth-network, and a shim's own socket.

use std::path::PathBuf;

use berth_core::mount::Mount;
use berth_core::snapshots::{Labels, RemoteSnapshotter, Snapshotter};
use berth_core::uds::Channel;
use berth_core::{Error, ErrorKind};
use berth_proto::berth::images::v1::{self as images, images_client::ImagesClient};
use berth_proto::berth::network::v1::{self as net, networks_client::NetworksClient};
use berth_proto::berth::shim::v1::{self as shim, shim_client::ShimClient};
use berth_proto::berth::types::v1 as types;
use futures::StreamExt;

use crate::deps::{BoxFuture, BoxStream, Images, Networks, Shim, Snapshots};

/// Whom the images service records as the owner of the engine's image users.
pub const IMAGE_USER_OWNER: &str = "engine";

/// berth-images over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteImages {
    client: ImagesClient<Channel>,
}

impl RemoteImages {
    /// A client for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            client: ImagesClient::new(berth_core::uds::channel(path)),
        }
    }
}

fn user(image_id: &str, container_id: &str) -> images::ImageUser {
    images::ImageUser {
        image_id: image_id.into(),
        kind: "container".into(),
        id: container_id.into(),
    }
}

impl Images for RemoteImages {
    fn resolve(
        &self,
        reference: &str,
        platform: Option<types::Platform>,
        snapshotter: &str,
        host_ids: bool,
    ) -> BoxFuture<'_, images::ResolveImageResponse> {
        let mut c = self.client.clone();
        let req = images::ResolveImageRequest {
            reference: reference.into(),
            platform,
            snapshotter: snapshotter.into(),
            host_ids,
        };
        Box::pin(async move { Ok(c.resolve(req).await?.into_inner()) })
    }

    fn add_user(&self, image_id: &str, container_id: &str) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = images::AddImageUserRequest {
            owner: IMAGE_USER_OWNER.into(),
            user: Some(user(image_id, container_id)),
        };
        Box::pin(async move {
            c.add_user(req).await?;
            Ok(())
        })
    }

    fn remove_user(&self, image_id: &str, container_id: &str) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = images::RemoveImageUserRequest {
            owner: IMAGE_USER_OWNER.into(),
            user: Some(user(image_id, container_id)),
        };
        Box::pin(async move {
            c.remove_user(req).await?;
            Ok(())
        })
    }

    fn set_users(&self, users: Vec<(String, String)>) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = images::SetImageUsersRequest {
            owner: IMAGE_USER_OWNER.into(),
            users: users.iter().map(|(i, c)| user(i, c)).collect(),
        };
        Box::pin(async move {
            c.set_users(req).await?;
            Ok(())
        })
    }

    fn create_image(
        &self,
        options: images::CreateImageOptions,
        layer: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> BoxFuture<'_, images::CreateImageResponse> {
        use images::create_image_request::Part;
        let mut c = self.client.clone();
        let first = images::CreateImageRequest {
            part: Some(Part::Options(options)),
        };
        let data = tokio_stream::wrappers::ReceiverStream::new(layer).map(|d| {
            images::CreateImageRequest {
                part: Some(Part::Data(d)),
            }
        });
        let stream = futures::stream::iter([first]).chain(data);
        Box::pin(async move { Ok(c.create_image(stream).await?.into_inner()) })
    }
}

/// The snapshotter over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteSnapshots(pub RemoteSnapshotter);

impl Snapshots for RemoteSnapshots {
    fn prepare(&self, key: &str, parent: &str, labels: Labels) -> BoxFuture<'_, Vec<Mount>> {
        let parent = (!parent.is_empty()).then(|| parent.to_string());
        let key = key.to_string();
        Box::pin(async move { self.0.prepare(&key, parent.as_deref(), labels).await })
    }

    fn mounts(&self, key: &str) -> BoxFuture<'_, Vec<Mount>> {
        let key = key.to_string();
        Box::pin(async move { self.0.mounts(&key).await })
    }

    fn remove(&self, key: &str) -> BoxFuture<'_, ()> {
        let key = key.to_string();
        Box::pin(async move {
            match self.0.remove(&key).await {
                Err(e) if e.is(ErrorKind::NotFound) => Ok(()),
                other => other,
            }
        })
    }

    fn usage(&self, key: &str) -> BoxFuture<'_, i64> {
        let key = key.to_string();
        Box::pin(async move { Ok(self.0.usage(&key).await?.size) })
    }
}

/// berth-network over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteNetworks {
    client: NetworksClient<Channel>,
}

impl RemoteNetworks {
    /// A client for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            client: NetworksClient::new(berth_core::uds::channel(path)),
        }
    }
}

impl Networks for RemoteNetworks {
    fn attach(&self, req: net::AttachRequest) -> BoxFuture<'_, net::Attachment> {
        let mut c = self.client.clone();
        Box::pin(async move {
            c.attach(req)
                .await?
                .into_inner()
                .attachment
                .ok_or_else(|| Error::internal("network attach returned no attachment"))
        })
    }

    fn detach(&self, container_id: &str, network: &str, force: bool) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = net::DetachRequest {
            container_id: container_id.into(),
            network: network.into(),
            force,
        };
        Box::pin(async move {
            c.detach(req).await?;
            Ok(())
        })
    }

    fn get(&self, network: &str) -> BoxFuture<'_, (String, String)> {
        let mut c = self.client.clone();
        let req = net::GetNetworkRequest { id: network.into() };
        Box::pin(async move {
            let n = c
                .get(req)
                .await?
                .into_inner()
                .network
                .ok_or_else(|| Error::internal("network get returned no network"))?;
            Ok((n.id, n.name))
        })
    }

    fn cni_attach(&self, req: net::CniAttachRequest) -> BoxFuture<'_, net::CniAttachResponse> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.cni_attach(req).await?.into_inner()) })
    }

    fn cni_detach(&self, container_id: &str, config_name: &str) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = net::CniDetachRequest {
            container_id: container_id.into(),
            config_name: config_name.into(),
            interface_name: String::new(),
        };
        Box::pin(async move {
            c.cni_detach(req).await?;
            Ok(())
        })
    }
}

/// A shim over its own socket.
#[derive(Debug, Clone)]
pub struct RemoteShim {
    client: ShimClient<Channel>,
}

impl RemoteShim {
    /// A client for the shim socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            client: ShimClient::new(berth_core::uds::channel(path)),
        }
    }
}

fn stream<T: Send + 'static>(s: tonic::Streaming<T>) -> BoxStream<T> {
    Box::pin(s.map(|r| r.map_err(Error::from)))
}

impl Shim for RemoteShim {
    fn create(&self, req: shim::CreateRequest) -> BoxFuture<'_, u32> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.create(req).await?.into_inner().pid) })
    }

    fn start(&self, exec_id: &str) -> BoxFuture<'_, u32> {
        let mut c = self.client.clone();
        let req = shim::StartRequest {
            exec_id: exec_id.into(),
        };
        Box::pin(async move { Ok(c.start(req).await?.into_inner().pid) })
    }

    fn state(&self, exec_id: &str) -> BoxFuture<'_, shim::StateResponse> {
        let mut c = self.client.clone();
        let req = shim::StateRequest {
            exec_id: exec_id.into(),
        };
        Box::pin(async move { Ok(c.state(req).await?.into_inner()) })
    }

    fn kill(&self, exec_id: &str, signal: u32, all: bool) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = shim::KillRequest {
            exec_id: exec_id.into(),
            signal,
            all,
        };
        Box::pin(async move {
            c.kill(req).await?;
            Ok(())
        })
    }

    fn wait(&self, exec_id: &str) -> BoxFuture<'_, shim::WaitResponse> {
        let mut c = self.client.clone();
        let req = shim::WaitRequest {
            exec_id: exec_id.into(),
        };
        Box::pin(async move { Ok(c.wait(req).await?.into_inner()) })
    }

    fn delete(&self, exec_id: &str, force: bool) -> BoxFuture<'_, shim::DeleteResponse> {
        let mut c = self.client.clone();
        let req = shim::DeleteRequest {
            exec_id: exec_id.into(),
            force,
        };
        Box::pin(async move { Ok(c.delete(req).await?.into_inner()) })
    }

    fn exec(&self, req: shim::ExecRequest) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        Box::pin(async move {
            c.exec(req).await?;
            Ok(())
        })
    }

    fn resize(&self, exec_id: &str, size: types::TerminalSize) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = shim::ResizePtyRequest {
            exec_id: exec_id.into(),
            size: Some(size),
        };
        Box::pin(async move {
            c.resize_pty(req).await?;
            Ok(())
        })
    }

    fn close_stdin(&self, exec_id: &str) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = shim::CloseIoRequest {
            exec_id: exec_id.into(),
            stdin: true,
        };
        Box::pin(async move {
            c.close_io(req).await?;
            Ok(())
        })
    }

    fn attach(
        &self,
        input: BoxStream<shim::AttachRequest>,
    ) -> BoxFuture<'_, BoxStream<shim::AttachResponse>> {
        let mut c = self.client.clone();
        // Forwarded through a channel: the request stream ends at the first error from the
        // engine's side, and tonic wants a plain `'static` stream.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut input = input;
            while let Some(Ok(msg)) = input.next().await {
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let input = tokio_stream::wrappers::ReceiverStream::new(rx);
        Box::pin(async move { Ok(stream(c.attach(input).await?.into_inner())) })
    }

    fn logs(&self, req: shim::LogsRequest) -> BoxFuture<'_, BoxStream<shim::LogsResponse>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(stream(c.logs(req).await?.into_inner())) })
    }

    fn pids(&self) -> BoxFuture<'_, Vec<shim::ProcessInfo>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.pids(shim::PidsRequest {}).await?.into_inner().processes) })
    }

    fn pause(&self) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        Box::pin(async move {
            c.pause(shim::PauseRequest {}).await?;
            Ok(())
        })
    }

    fn resume(&self) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        Box::pin(async move {
            c.resume(shim::ResumeRequest {}).await?;
            Ok(())
        })
    }

    fn update(&self, resources: Vec<u8>) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        let req = shim::UpdateRequest {
            resources,
            annotations: Default::default(),
        };
        Box::pin(async move {
            c.update(req).await?;
            Ok(())
        })
    }

    fn stats(&self) -> BoxFuture<'_, types::CgroupStats> {
        let mut c = self.client.clone();
        Box::pin(async move {
            Ok(c.stats(shim::StatsRequest {})
                .await?
                .into_inner()
                .stats
                .unwrap_or_default())
        })
    }

    fn info(&self) -> BoxFuture<'_, shim::InfoResponse> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.info(shim::InfoRequest {}).await?.into_inner()) })
    }

    fn health(&self) -> BoxFuture<'_, types::Health> {
        let mut c = self.client.clone();
        Box::pin(async move {
            Ok(c.health(shim::HealthRequest {})
                .await?
                .into_inner()
                .health
                .unwrap_or_default())
        })
    }

    fn reopen_log(&self) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        Box::pin(async move {
            c.reopen_log(shim::ReopenLogRequest {}).await?;
            Ok(())
        })
    }

    fn shutdown(&self, now: bool) -> BoxFuture<'_, ()> {
        let mut c = self.client.clone();
        Box::pin(async move {
            match c.shutdown(shim::ShutdownRequest { now }).await {
                Ok(_) => Ok(()),
                // The shim exits while answering; a broken connection means it is gone.
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                    ) =>
                {
                    Ok(())
                }
                Err(s) => Err(s.into()),
            }
        })
    }
}
