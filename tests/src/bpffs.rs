//! A private bpf filesystem for a test, unmounted (releasing every pin in it) on drop.

use std::path::{Path, PathBuf};

use crate::netns::{NetNsError, run};

/// A bpffs mounted on a fresh temporary directory.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// Mounts a new bpffs.
    pub fn new() -> Result<Self, NetNsError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "overlay-bpffs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).map_err(|source| NetNsError::Spawn {
            command: format!("mkdir {}", path.display()),
            source,
        })?;
        let p = path.to_string_lossy().into_owned();
        run("mount", &["-t", "bpf", "bpf", &p])?;
        Ok(Self { path })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let p = self.path.to_string_lossy().into_owned();
        if let Err(err) = run("umount", &[&p]) {
            eprintln!("cleanup: {err}");
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
