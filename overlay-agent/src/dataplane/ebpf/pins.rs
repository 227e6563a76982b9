//! Pinned programs' links and maps under a bpffs directory, so the dataplane outlives the agent.
//!
//! Layout under the root (`--bpffs`, default `/sys/fs/bpf/overlay-agent`, mode 0700):
//! - `maps-v<ABI>/<MAP>`: the maps. The ABI version (overlay_common::ABI_VERSION) is in the
//!   directory name, so a binary whose map layout differs never reuses maps it would misread.
//! - `links/<program>@<interface>`: the tcx links. They are version-independent on purpose: a new
//!   agent swaps its program into the existing link (bpf_link_update), which is atomic, so traffic
//!   never sees a moment without a program, not even across an upgrade that changes the maps.
//!
//! While the agent is down the pinned links keep their programs attached and the pinned maps keep
//! the peers: traffic keeps flowing.

use std::{
    io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

/// bpffs' magic, as statfs reports it.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors preparing the pin directory.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// The directory is not on a bpf filesystem and none could be mounted there.
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf {path})")]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was done.
        operation: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The pin directory of one agent.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

/// The interface name a link pin's name carries (see [`Pins::link_path`]).
pub fn interface_of_pin(encoded: &str) -> String {
    encoded.replace("%2e", ".").replace("%25", "%")
}

/// Where this version's maps are pinned under `root`.
pub fn maps_dir(root: &Path) -> PathBuf {
    root.join(format!("maps-v{}", overlay_common::ABI_VERSION))
}

impl Pins {
    /// Prepares `root`: mounts bpffs on /sys/fs/bpf when `root` is below it and nothing is
    /// mounted, then creates the directories (mode 0700).
    pub fn open(root: &Path) -> Result<Self, PinsError> {
        let sys_bpf = Path::new("/sys/fs/bpf");
        if root.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
            mount_bpffs(sys_bpf)?;
            tracing::info!("mounted a bpf filesystem on {}", sys_bpf.display());
        }
        let pins = Self {
            root: root.to_owned(),
        };
        for dir in [pins.root.clone(), pins.maps_dir(), pins.links_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| PinsError::Io {
                    operation: "creating",
                    path: dir.clone(),
                    source,
                })?;
        }
        if !is_bpffs(&pins.root) {
            return Err(PinsError::NotBpffs { path: pins.root });
        }
        Ok(pins)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this version's maps are pinned.
    pub fn maps_dir(&self) -> PathBuf {
        maps_dir(&self.root)
    }

    /// Where a map is pinned.
    pub fn map_path(&self, map: &str) -> PathBuf {
        self.maps_dir().join(map)
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Where the link of `program` on `interface` is pinned. bpffs refuses names with a dot
    /// (`flannel.1`), so dots (and the escape character itself) are percent-encoded.
    pub fn link_path(&self, program: &str, interface: &str) -> PathBuf {
        let interface = interface.replace('%', "%25").replace('.', "%2e");
        self.links_dir().join(format!("{program}@{interface}"))
    }

    /// Whether maps of this version were pinned by an earlier run (then they are reused).
    pub fn has_maps(&self) -> bool {
        std::fs::read_dir(self.maps_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Removes what the current run does not use: link pins other than `keep` (an interface that
    /// is no longer ours) and maps of other versions. Every failure is collected, none stops the
    /// rest.
    pub fn remove_stale(&self, keep: &[PathBuf]) -> Vec<PinsError> {
        let mut errors = Vec::new();
        for entry in read_dir(&self.links_dir(), &mut errors) {
            if !keep.contains(&entry) {
                remove(&entry, &mut errors);
            }
        }
        let current = self.maps_dir();
        for entry in read_dir(&self.root, &mut errors) {
            let name = entry.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("maps-v") && entry != current {
                remove(&entry, &mut errors);
            }
        }
        errors
    }

    /// Removes every pinned object and the directory itself: the programs detach as their last
    /// link reference goes. Every failure is collected, none stops the rest.
    pub fn teardown(root: &Path) -> Vec<PinsError> {
        let mut errors = Vec::new();
        if root.exists() {
            remove(root, &mut errors);
        }
        errors
    }
}

fn read_dir(dir: &Path, errors: &mut Vec<PinsError>) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            errors.push(PinsError::Io {
                operation: "listing",
                path: dir.to_owned(),
                source,
            });
            Vec::new()
        }
    }
}

/// Removes a pin or a directory of pins (bpffs supports unlink and rmdir, not much else).
fn remove(path: &Path, errors: &mut Vec<PinsError>) {
    let result = if path.is_dir() {
        for entry in read_dir(path, errors) {
            remove(&entry, errors);
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    if let Err(source) = result {
        errors.push(PinsError::Io {
            operation: "removing",
            path: path.to_owned(),
            source,
        });
    }
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; c is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> Result<(), PinsError> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: all pointers are valid C strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(PinsError::Io {
            operation: "mounting bpffs on",
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
