//! `overlay-agent docker-opts`: docker's daemon options from subnet.env, for setups that give
//! dockerd its options through an environment file (`/etc/default/docker`, `$DOCKER_OPTS`)
//! rather than the drop-in in `deploy/`.
//!
//! Its output is byte for byte that of flannel's `mk-docker-opts.sh` (v0.20 and later, run by
//! `/bin/sh`, as its first line says), flags alike:
//! - `-f FILE` subnet.env to read (default: `--subnet-file`, i.e. `/run/flannel/subnet.env`),
//!   `-d FILE` file to write (default `/run/docker_opts.env`), `-i` one variable per option
//!   (`DOCKER_OPT_BIP="--bip=..."`), `-c` the combined variable, `-k KEY` its name (default
//!   `DOCKER_OPTS`), `-m` never emit `--ip-masq`. Without `-i` and `-c`, both are written.
//! - Options come in the order of their variable names (BIP, IPMASQ, MTU), as the script's
//!   sorted `set` lists them; the combined value is the current value of `$KEY` in the
//!   environment followed by a space when it is not empty, then a space before each option.
//! - `FLANNEL_IPMASQ=true` gives docker `--ip-masq=false` (the agent masquerades, so docker
//!   must not as well), `false` gives `--ip-masq=true`, empty or absent none, and any other
//!   value is an error that writes nothing (`-m` skips all of it, the check included).
//!
//! Unlike the script, a missing or unreadable subnet.env (or one without FLANNEL_SUBNET) is an
//! error instead of an options file without `--bip`, and the file is replaced atomically. The
//! script's last step, refusing (after writing the file) when a route `via` a gateway already
//! covers the subnet, is not done.

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
    /// FLANNEL_IPMASQ is neither `true` nor `false` (the script's words).
    #[error("Invalid value of FLANNEL_IPMASQ: {0}")]
    InvalidIpMasq(String),
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
    // In the order of the variable names, as the script's sorted `set` lists them.
    let mut opts = vec![("DOCKER_OPT_BIP", format!("--bip={subnet}"))];
    if !args.no_ip_masq {
        match env_value(text, "FLANNEL_IPMASQ") {
            None => {}
            Some("true") => opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=false".to_owned())),
            Some("false") => opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=true".to_owned())),
            Some(other) => return Err(DockerOptsError::InvalidIpMasq(other.to_owned())),
        }
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
    let mut all = match existing {
        Some(e) if !e.is_empty() => format!("{e} "),
        _ => String::new(),
    };
    for (var, val) in &opts {
        if individual {
            out.push_str(&format!("{var}=\"{val}\"\n"));
        }
        all.push(' ');
        all.push_str(val);
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

    /// mk-docker-opts.sh's flags as a command line gives them.
    fn with_flags(flags: &str) -> DockerOptsArgs {
        let mut a = args();
        let mut words = flags.split_whitespace();
        while let Some(w) = words.next() {
            match w {
                "-i" => a.individual = true,
                "-c" => a.combined = true,
                "-m" => a.no_ip_masq = true,
                "-k" => a.key = words.next().unwrap().to_owned(),
                _ => panic!("{w}"),
            }
        }
        a
    }

    /// What flannel's mk-docker-opts.sh (v0.20.2 = current dist/, run by /bin/sh = dash) wrote
    /// to its -d file for a subnet.env of FLANNEL_NETWORK=172.16.0.0/12,
    /// FLANNEL_SUBNET=172.16.21.1/24, FLANNEL_MTU=1472 and FLANNEL_IPMASQ as given (None: no
    /// such line), with the flags given, and $DOCKER_OPTS and $EXTRA set to the third column (or
    /// unset); Err: it wrote nothing, printed that and exited 1.
    /// FLANNEL_IPMASQ, the flags, $DOCKER_OPTS/$EXTRA, the -d file's content or the error.
    type Case = (
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
        Result<&'static str, &'static str>,
    );

    #[rustfmt::skip]
    const MK_DOCKER_OPTS: &[Case] = &[
        (Some("true"), "", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-i", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("true"), "-i", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("true"), "-c", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-c", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-i -c", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-i -c", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("true"), "-m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("true"), "-i -m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("true"), "-i -m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("true"), "-c -m", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("true"), "-c -m", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("true"), "-c -k EXTRA", None, Ok("EXTRA=\" --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-c -k EXTRA", Some("--debug"), Ok("EXTRA=\"--debug  --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-k EXTRA", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nEXTRA=\" --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("true"), "-k EXTRA", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nEXTRA=\"--debug  --bip=172.16.21.1/24 --ip-masq=false --mtu=1472\"\n")),
        (Some("false"), "", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-i", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("false"), "-i", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("false"), "-c", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-c", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-i -c", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-i -c", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("false"), "-m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("false"), "-i -m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("false"), "-i -m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("false"), "-c -m", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("false"), "-c -m", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("false"), "-c -k EXTRA", None, Ok("EXTRA=\" --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-c -k EXTRA", Some("--debug"), Ok("EXTRA=\"--debug  --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-k EXTRA", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nEXTRA=\" --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("false"), "-k EXTRA", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nEXTRA=\"--debug  --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n")),
        (Some("bogus"), "", None, Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "", Some("--debug"), Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-i", None, Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-i", Some("--debug"), Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-c", None, Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-c", Some("--debug"), Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-i -c", None, Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-i -c", Some("--debug"), Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("bogus"), "-m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("bogus"), "-i -m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("bogus"), "-i -m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (Some("bogus"), "-c -m", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("bogus"), "-c -m", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (Some("bogus"), "-c -k EXTRA", None, Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-c -k EXTRA", Some("--debug"), Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-k EXTRA", None, Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (Some("bogus"), "-k EXTRA", Some("--debug"), Err("Invalid value of FLANNEL_IPMASQ: bogus")),
        (None, "", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-i", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (None, "-i", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (None, "-c", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-c", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-i -c", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-i -c", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-i -m", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (None, "-i -m", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n")),
        (None, "-c -m", None, Ok("DOCKER_OPTS=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-c -m", Some("--debug"), Ok("DOCKER_OPTS=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-c -k EXTRA", None, Ok("EXTRA=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-c -k EXTRA", Some("--debug"), Ok("EXTRA=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-k EXTRA", None, Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nEXTRA=\" --bip=172.16.21.1/24 --mtu=1472\"\n")),
        (None, "-k EXTRA", Some("--debug"), Ok("DOCKER_OPT_BIP=\"--bip=172.16.21.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nEXTRA=\"--debug  --bip=172.16.21.1/24 --mtu=1472\"\n")),
    ];

    #[test]
    fn byte_identical_to_mk_docker_opts() {
        for &(ipmasq, flags, existing, expected) in MK_DOCKER_OPTS {
            let mut text = "FLANNEL_NETWORK=172.16.0.0/12\nFLANNEL_SUBNET=172.16.21.1/24\n\
                            FLANNEL_MTU=1472\n"
                .to_owned();
            if let Some(v) = ipmasq {
                text.push_str(&format!("FLANNEL_IPMASQ={v}\n"));
            }
            let got = render(&text, &with_flags(flags), existing, Path::new("s.env"))
                .map_err(|e| e.to_string());
            let case = format!("FLANNEL_IPMASQ={ipmasq:?} flags {flags:?} existing {existing:?}");
            assert_eq!(
                got.as_deref(),
                expected.map_err(str::to_owned).as_deref(),
                "{case}"
            );
        }
        assert_eq!(MK_DOCKER_OPTS.len(), 72);
    }

    #[test]
    fn quoted_and_empty_values_and_errors() {
        // Values as the shell's `.` reads them; an empty FLANNEL_IPMASQ gives no --ip-masq.
        let quoted = "FLANNEL_SUBNET=\"10.1.2.1/24\"\nFLANNEL_MTU='1450'\nFLANNEL_IPMASQ=\n";
        assert_eq!(
            render_ok(quoted, &with_flags("-c"), None),
            "DOCKER_OPTS=\" --bip=10.1.2.1/24 --mtu=1450\"\n"
        );
        assert!(matches!(
            render(
                "FLANNEL_MTU=1472\n",
                &with_flags("-c"),
                None,
                Path::new("x")
            ),
            Err(DockerOptsError::NoSubnet { .. })
        ));
        assert!(matches!(
            render(ARTICLE, &with_flags("-k 1X"), None, Path::new("x")),
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
            ..with_flags("-c -k OVERLAY_TEST_UNSET_KEY")
        };
        write(&a, &subnet).unwrap();
        let written = std::fs::read_to_string(dir.join("docker_opts.env")).unwrap();
        assert_eq!(
            written,
            "OVERLAY_TEST_UNSET_KEY=\" --bip=172.16.21.1/24 --ip-masq=true --mtu=1472\"\n"
        );
        let mode = std::fs::metadata(dir.join("docker_opts.env"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(matches!(
            write(&a, &dir.join("missing.env")),
            Err(DockerOptsError::Read { .. })
        ));
        // An invalid FLANNEL_IPMASQ leaves the previous file as it was, as the script does.
        std::fs::write(&subnet, ARTICLE.replace("=false", "=yes")).unwrap();
        assert!(matches!(
            write(&a, &subnet),
            Err(DockerOptsError::InvalidIpMasq(v)) if v == "yes"
        ));
        assert_eq!(
            std::fs::read_to_string(dir.join("docker_opts.env")).unwrap(),
            written
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
