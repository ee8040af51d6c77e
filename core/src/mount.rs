//! Performing mounts described by snapshotters (containerd `Mount` lists).
