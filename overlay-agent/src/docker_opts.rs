//! `overlay-agent docker-opts`: docker's daemon options from subnet.env, for setups that give
//! dockerd its options through an environment file (`/etc/default/docker`, `$DOCKER_OPTS`)
//! rather than the drop-in in `deploy/`.
//!
//! It behaves as flannel's `mk-docker-opts.sh` does, flags and output alike:
//! - `-f FILE` subnet.env to read (default: `--subnet-file`, i.e. `/run/flannel/subnet.env`),
//!   `-d FILE` file to write (default `/run/docker_opts.env`), `-i` one variable per option
//!   (`DOCKER_OPT_BIP="--bip=..."`), `-c` the combined variable, `-k KEY` its name (default
//!   `DOCKER_OPTS`), `-m` never emit `--ip-masq`. Without `-i` and `-c`, both are written.
//! - Options are emitted in the order of their variable names (BIP, IPMASQ, MTU), as the script's
//!   `compgen -v` lists them; the combined value is the current value of `$KEY` in the
//!   environment, a space, then each option followed by a space.
//! - `--ip-masq=false` is emitted only when `FLANNEL_IPMASQ=true`: then the agent masquerades,
//!   so docker must not as well. Otherwise no `--ip-masq` is given and docker keeps its default.
//!
//! Unlike the script, a missing or unreadable subnet.env (or one without FLANNEL_SUBNET) is an
//! error instead of an options file without `--bip`, and the file is replaced atomically.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// `overlay-agent docker-opts` flags (mk-docker-opts.sh's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DockerOptsArgs {
    /// subnet.env to read [default: --subnet-file, /run/flannel/subnet.env].
    #[arg(short = 'f', value_name = "FLANNEL-ENV-FILE")]
    pub flannel_env: Option<PathBuf>,
    /// Docker environment file to write.
    #[arg(
        short = 'd',
        value_name = "DOCKER-ENV-FILE",
        default_value = "/run/docker_opts.env"
    )]
    pub docker_env: PathBuf,
    /// Write each option as its own variable, e.g. DOCKER_OPT_MTU="--mtu=1472".
    #[arg(short = 'i')]
    pub individual: bool,
    /// Write the combined options into one variable (DOCKER_OPTS, or -k's).
    #[arg(short = 'c')]
    pub combined: bool,
    /// Name of the combined variable.
    #[arg(
        short = 'k',
        value_name = "COMBINED-KEY",
        default_value = "DOCKER_OPTS"
    )]
    pub key: String,
    /// Never write --ip-masq (for docker versions without it).
    #[arg(short = 'm')]
    pub no_ip_masq: bool,
}

/// Why no options file was written.
#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    /// subnet.env could not be read.
    #[error("reading {path}: {source} (is the agent running? it writes this file once ready)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// subnet.env lacks FLANNEL_SUBNET.
    #[error("{path} has no FLANNEL_SUBNET")]
    NoSubnet {
        /// The file.
        path: PathBuf,
    },
    /// -k is not a shell variable name.
    #[error("-k {0:?} is not a valid variable name")]
    BadKey(String),
    /// The options file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The variables of a subnet.env (`KEY=value` lines, values optionally quoted).
fn env_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v)
        })
        // The shell's `source` keeps the last assignment.
        .next_back()
        .filter(|v| !v.is_empty())
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The options file's content for a subnet.env's `text`. `existing` is the current value of the
/// combined variable in the environment (the script starts from it).
pub fn render(
    text: &str,
    args: &DockerOptsArgs,
    existing: Option<&str>,
    source: &Path,
) -> Result<String, DockerOptsError> {
    if !valid_key(&args.key) {
        return Err(DockerOptsError::BadKey(args.key.clone()));
    }
    let subnet = env_value(text, "FLANNEL_SUBNET").ok_or_else(|| DockerOptsError::NoSubnet {
        path: source.to_owned(),
    })?;
    // In the order of the variable names, as `compgen -v DOCKER_OPT_` lists them.
    let mut opts = vec![("DOCKER_OPT_BIP", format!("--bip={subnet}"))];
    if env_value(text, "FLANNEL_IPMASQ") == Some("true") && !args.no_ip_masq {
        opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=false".to_owned()));
    }
    if let Some(mtu) = env_value(text, "FLANNEL_MTU") {
        opts.push(("DOCKER_OPT_MTU", format!("--mtu={mtu}")));
    }
    let (individual, combined) = if args.individual || args.combined {
        (args.individual, args.combined)
    } else {
        (true, true)
    };
    let mut out = String::new();
    let mut all = format!("{} ", existing.unwrap_or(""));
    for (var, val) in &opts {
        if individual {
            out.push_str(&format!("{var}=\"{val}\"\n"));
        }
        all.push_str(val);
        all.push(' ');
    }
    if combined {
        out.push_str(&format!("{}=\"{all}\"\n", args.key));
    }
    Ok(out)
}

/// Reads the subnet file and writes the docker options file (mode 0644, replaced atomically).
/// Returns the content written.
pub fn write(args: &DockerOptsArgs, subnet_file: &Path) -> Result<String, DockerOptsError> {
    let source = args.flannel_env.as_deref().unwrap_or(subnet_file);
    let text = std::fs::read_to_string(source).map_err(|e| DockerOptsError::Read {
        path: source.to_owned(),
        source: e,
    })?;
    let existing = std::env::var(&args.key).ok();
    let content = render(&text, args, existing.as_deref(), source)?;
    let path = &args.docker_env;
    let write_err = |source| DockerOptsError::Write {
        path: path.clone(),
        source,
    };
    let name = path.file_name().map_or_else(
        || "docker_opts.env".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(content)
}

/// `overlay-agent docker-opts`: writes the file, prints what it wrote, exits non-zero on failure.
pub fn main(args: &DockerOptsArgs, subnet_file: &Path) -> std::process::ExitCode {
    match write(args, subnet_file) {
        Ok(content) => {
            eprintln!("wrote {}:", args.docker_env.display());
            eprint!("{content}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("overlay-agent docker-opts: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTICLE: &str = "FLANNEL_NETWORK=172.16.0.0/12\nFLANNEL_SUBNET=172.16.21.1/24\n\
                           FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    fn args() -> DockerOptsArgs {
        DockerOptsArgs {
            key: "DOCKER_OPTS".into(),
            docker_env: "/run/docker_opts.env".into(),
            ..Default::default()
        }
    }

    fn render_ok(text: &str, args: &DockerOptsArgs, existing: Option<&str>) -> String {
        render(text, args, existing, Path::new("subnet.env")).unwrap()
    }

    #[test]
    fn default_writes_individual_and_combined_like_mk_docker_opts() {
        assert_eq!(
            render_ok(ARTICLE, &args(), None),
            "DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n\
             DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472 \"\n"
        );
    }

    #[test]
    fn ip_masq_true_turns_docker_masquerading_off() {
        let text = ARTICLE.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true");
        let a = DockerOptsArgs {
            combined: true,
            ..args()
        };
        assert_eq!(
            render_ok(&text, &a, None),
            "DOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=false --mtu=1472 \"\n"
        );
        let m = DockerOptsArgs {
            no_ip_masq: true,
            ..a
        };
        assert_eq!(
            render_ok(&text, &m, None),
            "DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472 \"\n"
        );
    }

    #[test]
    fn key_and_existing_value_and_individual_only() {
        let a = DockerOptsArgs {
            combined: true,
            key: "EXTRA".into(),
            ..args()
        };
        assert_eq!(
            render_ok(ARTICLE, &a, Some("--debug")),
            "EXTRA=\"--debug --bip=172.16.21.1/24 --mtu=1472 \"\n"
        );
        let i = DockerOptsArgs {
            individual: true,
            ..args()
        };
        assert_eq!(
            render_ok(ARTICLE, &i, None),
            "DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"
        );
    }

    #[test]
    fn quoted_values_and_errors() {
        let quoted = "FLANNEL_SUBNET=\"10.1.2.1/24\"\nFLANNEL_MTU='1450'\n";
        let a = DockerOptsArgs {
            combined: true,
            ..args()
        };
        assert_eq!(
            render_ok(quoted, &a, None),
            "DOCKER_OPTS=\" --bip=10.1.2.1/24 --mtu=1450 \"\n"
        );
        assert!(matches!(
            render("FLANNEL_MTU=1472\n", &a, None, Path::new("x")),
            Err(DockerOptsError::NoSubnet { .. })
        ));
        let bad = DockerOptsArgs {
            key: "1X".into(),
            ..a
        };
        assert!(matches!(
            render(ARTICLE, &bad, None, Path::new("x")),
            Err(DockerOptsError::BadKey(_))
        ));
    }

    #[test]
    fn writes_the_file_from_the_subnet_file() {
        let dir = std::env::temp_dir().join(format!("docker-opts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let subnet = dir.join("subnet.env");
        std::fs::write(&subnet, ARTICLE).unwrap();
        let a = DockerOptsArgs {
            docker_env: dir.join("docker_opts.env"),
            combined: true,
            ..args()
        };
        write(&a, &subnet).unwrap();
        let written = std::fs::read_to_string(dir.join("docker_opts.env")).unwrap();
        assert!(written.starts_with("DOCKER_OPTS=\" --bip=172.16.21.1/24"));
        let mode = std::fs::metadata(dir.join("docker_opts.env"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(matches!(
            write(&a, &dir.join("missing.env")),
            Err(DockerOptsError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
