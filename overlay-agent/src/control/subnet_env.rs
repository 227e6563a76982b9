//! `subnet.env`, the file docker's unit reads: written atomically in flannel's format and order.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use super::subnet::Subnet;

/// Errors of writing the subnet file.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// Creating the directory, writing the temporary file or renaming it failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The values flannel writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the whole overlay.
    pub network: Subnet,
    /// This host's subnet; written as its first address (`FLANNEL_SUBNET=10.5.34.1/24`).
    pub subnet: Subnet,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// The file's content, in flannel's order.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            self.subnet.first_host(),
            self.subnet.prefix(),
            self.mtu,
            self.ip_masq
        )
    }

    /// Writes the file atomically: readers (docker's `EnvironmentFile=`) see the old content or
    /// the new, never a partial file. Mode 0644 whatever the umask; the directory is created.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| SubnetEnvError::Write { path, source }
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let name = path
            .file_name()
            .map_or("subnet.env".into(), |n| n.to_string_lossy());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(path)(e)
        })
    }
}

/// The subnet recorded by a previous run (its `FLANNEL_SUBNET`), if the file exists and has one.
pub fn previous_subnet(path: &Path) -> Option<Subnet> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET="))
        .and_then(|v| v.trim().trim_matches('"').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_format_and_roundtrip() {
        let env = SubnetEnv {
            network: "172.16.0.0/12".parse().unwrap(),
            subnet: "172.16.21.0/24".parse().unwrap(),
            mtu: 1472,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=172.16.0.0/12\nFLANNEL_SUBNET=172.16.21.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("subnet-env-test-{}", std::process::id()));
        let path = dir.join("a/b/subnet.env");
        env.write(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(previous_subnet(&path), Some(env.subnet));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temp left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(previous_subnet(&path), None);
    }
}
