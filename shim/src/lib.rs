//! berth-shim: one process per container. It drives the OCI runtime, owns the container's stdio
//! and logs, reaps its processes and keeps their exit statuses until the engine deletes them.

pub use berth_core::cgroup;
pub mod console;
pub mod convert;
pub mod daemon;
pub mod events;
pub mod health;
pub mod inproc;
pub mod logger;
pub mod logreader;
pub mod memory;
pub mod nsexec;
pub mod reaper;
pub mod rfc3339;
pub mod runtime;
pub mod seccomp;
pub mod server;
pub mod stdio;
pub mod task;
pub mod trace;
pub mod vm;
