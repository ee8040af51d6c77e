//! berth-shim: one process per container. It drives the OCI runtime, owns the container's stdio
//! and logs, reaps its processes and keeps their exit statuses until the engine deletes them.

pub mod console;
pub mod logger;
pub mod logreader;
pub mod reaper;
pub mod rfc3339;
pub mod runtime;
