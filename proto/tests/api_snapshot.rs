//! Fails when the internal APIs change without `proto/api.snapshot` being updated with them, so
//! every wire change is a visible diff in review. Regenerate with
//! `BERTH_UPDATE_API_SNAPSHOT=1 cargo test -p berth-proto --test api_snapshot`.

use std::fmt::Write as _;

use berth_proto::prost::Message;
use berth_proto::prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorSet, field_descriptor_proto::Label,
    field_descriptor_proto::Type,
};

fn render_enum(out: &mut String, indent: &str, e: &EnumDescriptorProto) {
    writeln!(out, "{indent}enum {}", e.name()).unwrap();
    for v in &e.value {
        writeln!(out, "{indent}  {} = {}", v.name(), v.number()).unwrap();
    }
}

fn render_message(out: &mut String, indent: &str, m: &DescriptorProto) {
    writeln!(out, "{indent}message {}", m.name()).unwrap();
    let inner = format!("{indent}  ");
    for f in &m.field {
        let label = match f.label() {
            Label::Repeated => "repeated ",
            Label::Optional if f.proto3_optional() => "optional ",
            _ => "",
        };
        let ty = match f.r#type() {
            Type::Message | Type::Enum => f.type_name().to_string(),
            other => other
                .as_str_name()
                .trim_start_matches("TYPE_")
                .to_lowercase(),
        };
        let oneof = f
            .oneof_index
            .filter(|_| !f.proto3_optional())
            .map(|i| format!(" (oneof {})", m.oneof_decl[i as usize].name()))
            .unwrap_or_default();
        writeln!(
            out,
            "{inner}{label}{ty} {} = {}{oneof}",
            f.name(),
            f.number()
        )
        .unwrap();
    }
    for e in &m.enum_type {
        render_enum(out, &inner, e);
    }
    for n in &m.nested_type {
        render_message(out, &inner, n);
    }
}

fn render(fds: &FileDescriptorSet) -> String {
    let mut files: Vec<_> = fds.file.iter().collect();
    files.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::new();
    for file in files {
        if file.package().starts_with("google.") {
            continue;
        }
        writeln!(out, "file {} (package {})", file.name(), file.package()).unwrap();
        for s in &file.service {
            writeln!(out, "  service {}", s.name()).unwrap();
            for m in &s.method {
                let cs = if m.client_streaming() { "stream " } else { "" };
                let ss = if m.server_streaming() { "stream " } else { "" };
                writeln!(
                    out,
                    "    rpc {}({cs}{}) returns ({ss}{})",
                    m.name(),
                    m.input_type(),
                    m.output_type()
                )
                .unwrap();
            }
        }
        for e in &file.enum_type {
            render_enum(&mut out, "  ", e);
        }
        for m in &file.message_type {
            render_message(&mut out, "  ", m);
        }
    }
    out
}

#[test]
fn api_matches_committed_snapshot() {
    let fds = FileDescriptorSet::decode(berth_proto::FILE_DESCRIPTOR_SET).unwrap();
    let rendered = render(&fds);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api.snapshot");
    if std::env::var_os("BERTH_UPDATE_API_SNAPSHOT").is_some() {
        std::fs::write(path, &rendered).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed != rendered {
        let first = committed
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(rendered.lines().count()));
        panic!(
            "the internal API changed without proto/api.snapshot (first difference at line {}).\n\
             If the change is intended, run BERTH_UPDATE_API_SNAPSHOT=1 cargo test -p berth-proto \
             --test api_snapshot and commit the snapshot.",
            first + 1
        );
    }
}

#[test]
fn snapshots_api_is_containerd_wire_compatible() {
    let fds = FileDescriptorSet::decode(berth_proto::FILE_DESCRIPTOR_SET).unwrap();
    let file = fds
        .file
        .iter()
        .find(|f| f.package() == "containerd.services.snapshots.v1")
        .expect("snapshots api present");
    let svc = &file.service[0];
    assert_eq!(svc.name(), "Snapshots");
    let methods: Vec<_> = svc.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        [
            "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
            "Cleanup"
        ]
    );
    let commit = file
        .message_type
        .iter()
        .find(|m| m.name() == "CommitSnapshotRequest")
        .unwrap();
    let fields: Vec<_> = commit
        .field
        .iter()
        .map(|f| (f.name(), f.number()))
        .collect();
    assert_eq!(
        fields,
        [
            ("snapshotter", 1),
            ("name", 2),
            ("key", 3),
            ("labels", 4),
            ("parent", 5)
        ]
    );
}
