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

/// A link an agent pinned under `<pins>/links/`, as `bpftool link show pinned` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedLink {
    /// The pin.
    pub path: PathBuf,
    /// The kernel's id of the link (the same link across an agent restart).
    pub link_id: u32,
    /// The id of the program the link runs now (a new one after a restarted agent swapped its
    /// programs in).
    pub prog_id: u32,
}

/// The links pinned under `pins/links/`, by pin path; empty when there are none.
pub fn pinned_links(pins: &Path) -> Vec<PinnedLink> {
    let Ok(dir) = pins.join("links").read_dir() else {
        return Vec::new();
    };
    let mut links: Vec<PinnedLink> = dir
        .filter_map(Result::ok)
        .map(|entry| {
            let path = entry.path();
            let out = run(
                "bpftool",
                &["link", "show", "pinned", &path.to_string_lossy()],
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let text = String::from_utf8_lossy(&out.stdout);
            let (link_id, prog_id) = parse_link_show(&text)
                .unwrap_or_else(|| panic!("bpftool link show {}: {text}", path.display()));
            PinnedLink {
                path,
                link_id,
                prog_id,
            }
        })
        .collect();
    links.sort_by(|a, b| a.path.cmp(&b.path));
    links
}

/// (link id, program id) from `bpftool link show`'s plain output (`12: tcx  prog 45 ...`).
fn parse_link_show(text: &str) -> Option<(u32, u32)> {
    let mut words = text.split_whitespace();
    let link_id = words.next()?.strip_suffix(':')?.parse().ok()?;
    let prog_id = words.skip_while(|w| *w != "prog").nth(1)?.parse().ok()?;
    Some((link_id, prog_id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_bpftool_link_show() {
        let text = "12: tcx  prog 45  \n\tifindex eth0(2)  attach_type tcx_ingress  \n";
        assert_eq!(super::parse_link_show(text), Some((12, 45)));
        assert_eq!(super::parse_link_show("Error: bad"), None);
    }
}
