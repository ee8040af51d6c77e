//! The guest image of a `berth-vm` VM: a kernel taken from a Debian `linux-image-*-cloud-amd64`
//! package and an initramfs whose `/init` is `berth-agent`.
//!
//! The initramfs (a newc cpio, uncompressed) holds the agent, the shared libraries it loads (found
//! with `ldd`, at the paths `ldd` names, with the dynamic loader), the kernel modules the guest
//! needs for virtio-mmio/PCI, vsock, virtio-fs and virtio-net (with their dependencies, read from
//! each module's `depends=` modinfo, since Debian ships no `modules.dep`), and
//! [`MODULE_LIST`], the modules' paths in load order, which the agent loads with
//! `finit_module(2)`.
//!
//! Images are cached under `<cache_dir>/<key>/{vmlinuz,initrd,release}`, the key hashing the
//! kernel package's name and size, the agent's and its libraries' contents, and
//! [`FORMAT`]. They are built in a temporary directory and renamed into place while holding
//! `<cache_dir>/.lock`, so shims building at once neither collide nor see a partial image.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_core::{Context, Error, ErrorKind, Result};
use sha2::{Digest, Sha256};

/// Where install-deps puts the guest kernel package when none is configured.
pub const DEFAULT_KERNEL_DIR: &str = "/var/cache/berth/vm";
/// The guest path of the module list: one path per line, in load order.
pub const MODULE_LIST: &str = "etc/berth/modules";
/// The modules the guest loads (with their dependencies first).
pub const MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_net",
];
/// Bumped when the image layout changes, so old cache entries are not reused.
const FORMAT: &str = "berth-vm-guest-1";

/// Where the guest image comes from and where it is cached.
#[derive(Debug, Clone)]
pub struct GuestImageConfig {
    /// The kernel package; `None` looks for `linux-image-*-cloud-amd64_*.deb` in
    /// [`DEFAULT_KERNEL_DIR`] (the newest by name).
    pub kernel_deb: Option<PathBuf>,
    /// The `berth-agent` binary (becomes `/init`).
    pub agent_binary: PathBuf,
    /// `<data_root>/vm/guest`.
    pub cache_dir: PathBuf,
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel's release ("6.1.0-57-cloud-amd64").
    pub kernel_release: String,
}

/// `berth-agent` next to the running executable: where the packages install it beside
/// `berth-shim`.
pub fn default_agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let agent = exe.parent()?.join("berth-agent");
    agent.is_file().then_some(agent)
}

/// The guest image for `cfg`, built on first use.
pub fn ensure(cfg: &GuestImageConfig) -> Result<GuestImage> {
    let deb = match &cfg.kernel_deb {
        Some(d) => d.clone(),
        None => find_kernel_deb(Path::new(DEFAULT_KERNEL_DIR))?,
    };
    if !deb.is_file() {
        return Err(Error::not_found(format!(
            "berth-vm: no guest kernel: {} does not exist",
            deb.display()
        )));
    }
    if !cfg.agent_binary.is_file() {
        return Err(Error::not_found(format!(
            "berth-vm: no guest agent: {} does not exist",
            cfg.agent_binary.display()
        )));
    }
    let libs = shared_libraries(&cfg.agent_binary)?;
    let key = cache_key(&deb, &cfg.agent_binary, &libs)?;
    let dir = cfg.cache_dir.join(&key);
    if let Some(img) = cached(&dir) {
        return Ok(img);
    }
    std::fs::create_dir_all(&cfg.cache_dir)
        .internal(|| format!("create {}", cfg.cache_dir.display()))?;
    let lock_path = cfg.cache_dir.join(".lock");
    let lock = File::create(&lock_path).internal(|| format!("open {}", lock_path.display()))?;
    // SAFETY: flock on an fd this function owns; the lock goes with the fd.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::internal(format!("lock {}", lock_path.display()))
            .with_source(std::io::Error::last_os_error()));
    }
    if let Some(img) = cached(&dir) {
        return Ok(img);
    }
    let tmp = cfg
        .cache_dir
        .join(format!(".tmp-{key}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).internal(|| format!("create {}", tmp.display()))?;
    let built = build(&deb, &cfg.agent_binary, &libs, &tmp).and_then(|()| {
        std::fs::rename(&tmp, &dir).internal(|| format!("rename to {}", dir.display()))
    });
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    built?;
    tracing::info!(dir = %dir.display(), kernel = %deb.display(), "built berth-vm guest image");
    cached(&dir).ok_or_else(|| Error::internal(format!("{} vanished", dir.display())))
}

fn cached(dir: &Path) -> Option<GuestImage> {
    let release = std::fs::read_to_string(dir.join("release")).ok()?;
    let img = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd"),
        kernel_release: release.trim().to_string(),
    };
    (img.kernel.is_file() && img.initrd.is_file()).then_some(img)
}

/// The newest `linux-image-*-cloud-amd64_*.deb` in `dir`.
pub fn find_kernel_deb(dir: &Path) -> Result<PathBuf> {
    let missing = || {
        Error::not_found(format!(
            "berth-vm: no guest kernel: no linux-image-*-cloud-amd64 .deb in {} \
             (deploy/install-deps.sh downloads it)",
            dir.display()
        ))
    };
    let entries = std::fs::read_dir(dir).map_err(|_| missing())?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("linux-image-")
                && name.ends_with(".deb")
                && name
                    .split('_')
                    .next()
                    .is_some_and(|pkg| pkg.ends_with("-cloud-amd64"))
        })
        .max()
        .ok_or_else(missing)
}

/// The shared libraries `binary` loads (and the dynamic loader), as absolute paths; empty for a
/// static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context(ErrorKind::NotFound, "berth-vm: run ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd says "not a dynamic executable" (on stderr or stdout) for a static binary.
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") || text.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(Error::internal(format!(
            "ldd {}: {}",
            binary.display(),
            err.trim()
        )));
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(Error::not_found(format!(
                        "berth-vm: agent library {} not found",
                        name.trim()
                    )));
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn cache_key(deb: &Path, agent: &Path, libs: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(FORMAT);
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    let size = std::fs::metadata(deb)
        .internal(|| format!("stat {}", deb.display()))?
        .len();
    // The file name is package_version_arch.deb: name and version.
    h.update(format!("\0{name}\0{size}\0").as_bytes());
    for f in std::iter::once(agent).chain(libs.iter().map(PathBuf::as_path)) {
        let mut file = File::open(f).internal(|| format!("open {}", f.display()))?;
        std::io::copy(&mut file, &mut h).internal(|| format!("read {}", f.display()))?;
        h.update(f.as_os_str().as_encoded_bytes());
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// A kernel module read from the package.
struct Module {
    file: String,
    bytes: Vec<u8>,
}

fn build(deb: &Path, agent: &Path, libs: &[PathBuf], out: &Path) -> Result<()> {
    let (release, modules) = extract_kernel(deb, &out.join("vmlinuz"))?;
    let order = module_order(&modules, MODULES)?;

    let initrd_path = out.join("initrd");
    let file =
        File::create(&initrd_path).internal(|| format!("create {}", initrd_path.display()))?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    let io = |e: std::io::Error| Error::internal("write initrd").with_source(e);
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "etc",
        "etc/berth",
    ] {
        cpio.dir(dir).map_err(io)?;
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1).map_err(io)?;
    let agent_bytes = std::fs::read(agent).internal(|| format!("read {}", agent.display()))?;
    cpio.file("init", 0o755, &agent_bytes).map_err(io)?;
    drop(agent_bytes);
    for lib in libs {
        let bytes = std::fs::read(lib).internal(|| format!("read {}", lib.display()))?;
        let rel = lib
            .strip_prefix("/")
            .unwrap_or(lib)
            .to_string_lossy()
            .into_owned();
        cpio.file(&rel, 0o755, &bytes).map_err(io)?;
    }
    let mut list = String::new();
    for name in &order {
        let m = &modules[name];
        let rel = format!("lib/modules/{release}/{}", m.file);
        cpio.file(&rel, 0o644, &m.bytes).map_err(io)?;
        list.push('/');
        list.push_str(&rel);
        list.push('\n');
    }
    cpio.file(MODULE_LIST, 0o644, list.as_bytes()).map_err(io)?;
    cpio.finish().map_err(io)?;
    std::fs::write(out.join("release"), format!("{release}\n"))
        .internal(|| format!("write {}", out.display()))?;
    Ok(())
}

/// Writes the kernel of `deb` to `kernel` and returns its release and every module of the
/// package by name.
fn extract_kernel(deb: &Path, kernel: &Path) -> Result<(String, HashMap<String, Module>)> {
    let bad = |what: &str| Error::invalid_argument(format!("{}: {what}", deb.display()));
    let mut f = BufReader::new(File::open(deb).internal(|| format!("open {}", deb.display()))?);
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).map_err(|_| bad("not a .deb"))?;
    if &magic != b"!<arch>\n" {
        return Err(bad("not a .deb (no ar header)"));
    }
    // ar members: a 60-byte header (name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2),
    // then the data, padded to an even length.
    let (name, size) = loop {
        let mut hdr = [0u8; 60];
        f.read_exact(&mut hdr)
            .map_err(|_| bad("no data.tar member"))?;
        let name = String::from_utf8_lossy(&hdr[..16])
            .trim()
            .trim_end_matches('/')
            .to_string();
        let size: u64 = String::from_utf8_lossy(&hdr[48..58])
            .trim()
            .parse()
            .map_err(|_| bad("corrupt ar header"))?;
        if name.starts_with("data.tar") {
            break (name, size);
        }
        f.seek(SeekFrom::Current((size + size % 2) as i64))
            .map_err(|_| bad("truncated"))?;
    };
    let member = f.take(size);
    let reader: Box<dyn Read> = match name.as_str() {
        "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(member)),
        "data.tar" => Box::new(member),
        other => {
            return Err(bad(&format!(
                "unsupported member {other} (expected data.tar.xz)"
            )));
        }
    };
    let mut archive = tar::Archive::new(reader);
    let mut release = None;
    let mut modules = HashMap::new();
    let entries = archive
        .entries()
        .map_err(|e| bad("read data.tar").with_source(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad("read data.tar").with_source(e))?;
        let path = entry
            .path()
            .map_err(|e| bad("read data.tar").with_source(e))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if let Some(rel) = path.strip_prefix("boot/vmlinuz-") {
            release = Some(rel.to_string());
            let mut out =
                File::create(kernel).internal(|| format!("create {}", kernel.display()))?;
            std::io::copy(&mut entry, &mut out)
                .internal(|| format!("write {}", kernel.display()))?;
        } else if path.ends_with(".ko") && path.contains("lib/modules/") {
            let file = path.rsplit('/').next().unwrap_or_default().to_string();
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| bad("read data.tar").with_source(e))?;
            let name = module_name(&file);
            modules.insert(name, Module { file, bytes });
        }
    }
    let release = release.ok_or_else(|| bad("no boot/vmlinuz-* in the package"))?;
    Ok((release, modules))
}

/// "virtio-rng.ko" → "virtio_rng": the kernel treats `-` and `_` alike in module names.
fn module_name(file: &str) -> String {
    file.trim_end_matches(".ko").replace('-', "_")
}

/// The modules a module's `.modinfo` says it depends on.
fn module_depends(bytes: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut deps = Vec::new();
    let mut i = 0;
    while let Some(off) = bytes[i..].windows(KEY.len()).position(|w| w == KEY) {
        let at = i + off;
        i = at + KEY.len();
        if at > 0 && bytes[at - 1] != 0 {
            continue;
        }
        let end = bytes[i..]
            .iter()
            .position(|&b| b == 0)
            .map_or(bytes.len(), |e| i + e);
        let value = String::from_utf8_lossy(&bytes[i..end]);
        deps.extend(
            value
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_")),
        );
        break;
    }
    deps
}

/// `roots` and their dependencies, dependencies first. A root the package lacks is skipped (it
/// may be built in); a missing dependency is an error.
fn module_order(modules: &HashMap<String, Module>, roots: &[&str]) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        modules: &HashMap<String, Module>,
        deps: &mut BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if depth > 64 {
            return Err(Error::internal(format!("module dependency loop at {name}")));
        }
        let m = modules.get(name).ok_or_else(|| {
            Error::not_found(format!(
                "berth-vm: guest kernel module {name} not in the package"
            ))
        })?;
        let ds = deps
            .entry(name.to_string())
            .or_insert_with(|| module_depends(&m.bytes))
            .clone();
        for d in ds {
            visit(&d, modules, deps, done, order, depth + 1)?;
        }
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    let mut deps = BTreeMap::new();
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for root in roots {
        if modules.contains_key(*root) {
            visit(root, modules, &mut deps, &mut done, &mut order, 0)?;
        }
    }
    Ok(order)
}

/// A writer of "newc" cpio archives (the initramfs format).
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        self.written += n as u64;
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// A directory, and its parents first.
    fn dir(&mut self, path: &str) -> std::io::Result<()> {
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, (0, 0), &[])
    }

    fn parent(&mut self, path: &str) -> std::io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.parent(path)?;
        self.entry(path, 0o100000 | perm, (0, 0), data)
    }

    fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> std::io::Result<()> {
        self.parent(path)?;
        self.entry(path, 0o020000 | perm, (major, minor), &[])
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libseccomp.so.2",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let m = |deps: &str| Module {
            file: String::new(),
            bytes: format!("\0license=GPL\0depends={deps}\0name=x\0").into_bytes(),
        };
        let modules: HashMap<String, Module> = [
            ("virtiofs", m("fuse,virtio")),
            ("fuse", m("")),
            ("virtio", m("")),
            ("virtio_mmio", m("virtio,virtio_ring")),
            ("virtio_ring", m("")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let order = module_order(&modules, &["virtio_mmio", "virtiofs", "absent"]).unwrap();
        assert_eq!(
            order,
            ["virtio", "virtio_ring", "virtio_mmio", "fuse", "virtiofs"]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut buf = Vec::new();
        let mut c = Cpio::new(&mut buf);
        c.file("a/b/init", 0o755, b"hello").unwrap();
        c.finish().unwrap();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("a\0") && text.contains("a/b\0") && text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn missing_kernel_package_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_kernel_deb(dir.path()).unwrap_err();
        assert!(
            err.message().contains("no linux-image-*-cloud-amd64 .deb"),
            "{err}"
        );
    }
}
