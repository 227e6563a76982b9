//! The TCP congestion control of the bench's sockets, the same in every mode.
//!
//! It is made the default of the two containers' namespaces, so every TCP socket there is born
//! with it. `iperf3 -C` is not enough: iperf3 (3.12 at least) sets it after `connect`, so the socket
//! was initialised by the machine's default first, and a socket born under bbr keeps bbr's
//! internal pacing (`sk_pacing_status`) after switching to cubic. That hybrid paces with an
//! hrtimer per burst and measured 5-10 Gbit/s where real cubic moved 12-14 on the vxlan modes.
//!
//! A namespace other than the initial one may only default to an algorithm in the machine-wide
//! `net.ipv4.tcp_allowed_congestion_control`, so [`TcpCc::select`] adds it there for the run
//! (that list only says what unprivileged sockets may pick) and puts the list back when dropped,
//! or from the interrupt watchdog through [`restore_allowed`].

use std::sync::Mutex;

use anyhow::{Context as _, bail};
use overlay_tests::netns::NetNs;

const DEFAULT: &str = "/proc/sys/net/ipv4/tcp_congestion_control";
const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// The algorithm the bench uses unless `--tcp-cc` says otherwise: Linux's default, so the
/// numbers do not depend on how a machine happens to be tuned.
pub const PREFERRED: &str = "cubic";

/// The allowed list as it was before this run widened it, for the watchdog.
static ALLOWED_BEFORE: Mutex<Option<String>> = Mutex::new(None);

/// The congestion control chosen for this run.
#[derive(Debug)]
pub struct TcpCc {
    /// `None`: the machine's default, left alone.
    name: Option<String>,
    /// The machine's default.
    system: String,
}

/// What the report says about it.
pub struct Choice {
    pub cc: TcpCc,
    pub notes: Vec<String>,
}

impl TcpCc {
    /// `requested` is `--tcp-cc`: unset for [`PREFERRED`] (the machine's default where that is not
    /// available, said in a note), `system` for the machine's default, or an algorithm's name.
    pub fn select(requested: Option<&str>) -> anyhow::Result<Choice> {
        let system = read(DEFAULT).unwrap_or_else(|_| "unknown".into());
        let available = read(AVAILABLE).unwrap_or_default();
        let is_available = |name: &str| available.split_whitespace().any(|a| a == name);
        let mut notes = Vec::new();
        let name = match requested {
            None if is_available(PREFERRED) => Some(PREFERRED.to_owned()),
            None => {
                notes.push(format!(
                    "{PREFERRED} is not available here ({available}): the machine's default is \
                     used"
                ));
                None
            }
            Some("system") => None,
            Some(name) if is_available(name) => Some(name.to_owned()),
            Some(name) => bail!(
                "--tcp-cc {name}: not available here (available: {available}; `system` uses the \
                 default, {system})"
            ),
        };
        let mut name = name.filter(|n| *n != system);
        if let Some(n) = &name
            && let Err(e) = allow(n)
        {
            // Asked for by name: fail. By default: say so and measure under the machine's.
            if requested.is_some() {
                return Err(e);
            }
            notes.push(format!(
                "{n} could not be made the containers' default ({e:#}): the machine's default is \
                 used"
            ));
            name = None;
        }
        let cc = TcpCc { name, system };
        notes.push(format!(
            "TCP congestion control: {} in every mode{}.",
            cc.effective(),
            match &cc.name {
                Some(_) => format!(
                    " (the containers' default, so sockets are born with it; this machine's \
                     default is {})",
                    cc.system
                ),
                None => " (this machine's default)".into(),
            }
        ));
        Ok(Choice { cc, notes })
    }

    /// The algorithm every TCP socket of the measurement uses.
    pub fn effective(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.system)
    }

    /// Makes it the default of `ns` (a container's namespace, before its sockets open).
    pub fn apply(&self, ns: &NetNs) -> anyhow::Result<()> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        let written = ns
            .run(|| std::fs::write(DEFAULT, name).and_then(|()| read(DEFAULT)))
            .with_context(|| format!("entering {}", ns.name()))?
            .with_context(|| format!("setting {DEFAULT} to {name} in {}", ns.name()))?;
        if written != *name {
            bail!(
                "{DEFAULT} in {} reads {written} after writing {name}",
                ns.name()
            );
        }
        Ok(())
    }
}

impl Drop for TcpCc {
    fn drop(&mut self) {
        restore_allowed();
    }
}

/// Adds `name` to the allowed list unless it is there, remembering the list as it was.
fn allow(name: &str) -> anyhow::Result<()> {
    let before = read(ALLOWED).with_context(|| format!("reading {ALLOWED}"))?;
    if before.split_whitespace().any(|a| a == name) {
        return Ok(());
    }
    std::fs::write(ALLOWED, format!("{before} {name}"))
        .with_context(|| format!("adding {name} to {ALLOWED}"))?;
    *ALLOWED_BEFORE.lock().unwrap_or_else(|e| e.into_inner()) = Some(before);
    Ok(())
}

/// Puts the allowed list back as it was before [`TcpCc::select`] widened it, if it did.
pub fn restore_allowed() {
    let before = ALLOWED_BEFORE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(before) = before
        && let Err(e) = std::fs::write(ALLOWED, &before)
    {
        eprintln!("==> bench: could not restore {ALLOWED} to \"{before}\": {e}");
    }
}

fn read(path: &str) -> std::io::Result<String> {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned())
}
