//! `cargo xtask fuzz --capture-corpus`: the fuzzers' seed corpus from real traffic. Per format, a
//! three-host flannel cluster (flanneld stand-ins: the kernel's VXLAN device for vxlan, the
//! per-packet proxy for udp) whose host h1 is then swapped to overlay-agent on the eBPF
//! datapath; while the cluster's ping flows run and TCP streams cross h1 both ways, h1's underlay
//! NIC is captured. Outgoing frames are the agent's eBPF encapsulation, incoming ones the
//! stand-ins'. From each origin, one frame per shape (inner protocol, length, TCP flags) is kept,
//! re-addressed for the fuzzers' host (`overlay_tests::capture::readdress`), and written:
//! - `tests/corpus/<format>/<origin>-<n>.frame`: whole Ethernet frames, for the eBPF fuzzer;
//! - `fuzz/seeds/codec/<format>-<origin>-<n>`: the codec target's input (its 20 parameter bytes,
//!   set to the fuzzers' host, then the UDP payload).
//!
//! The directories are replaced as a whole, so a capture is reproducible from the tree.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use overlay_common::{maps::Encap, wire};
use overlay_tests::{
    capture::{self, Capture, Shape},
    cluster::tcp_transfer,
    flanneld,
    lab::UNDERLAY_IF,
    migration::{Migration, Plan},
    receive_cases::{self, MY_VTEP, PEER, PEER_VTEP, VNI},
};

use crate::cmd::{step, workspace_root};

/// Namespace prefix of the capture's lab.
const PREFIX: &str = "fc";
/// Frames kept per origin and format at most: a corpus, not a trace.
const PER_ORIGIN: usize = 16;
/// Bytes of each TCP stream across h1 (large enough for full-sized segments and their ACKs).
const STREAM: usize = 512 << 10;

/// Captures both formats and writes the corpus; returns the frames written per format.
pub fn capture_corpus(binary: &Path) -> anyhow::Result<()> {
    let root = workspace_root();
    let seeds = root.join("fuzz/seeds/codec");
    replace_dir(&seeds)?;
    for (encap, backend, name, theirs) in [
        (
            Encap::Udp,
            flanneld::Backend::Udp,
            "udp",
            "flannel-udp-proxy",
        ),
        (
            Encap::Vxlan,
            flanneld::Backend::Vxlan,
            "vxlan",
            "kernel-vxlan",
        ),
    ] {
        let dir = root.join("tests/corpus").join(name);
        replace_dir(&dir)?;
        let frames = capture_one(binary, encap, backend)
            .with_context(|| format!("capturing the {name} format"))?;
        let mut written = 0;
        for (origin, outgoing) in [("agent-ebpf", true), (theirs, false)] {
            let mut shapes = BTreeSet::new();
            let mut n = 0;
            for f in frames.iter().filter(|f| f.outgoing == outgoing) {
                // Larger than the wire's frames: a GSO aggregate seen before segmentation.
                if f.bytes.len() > wire::ETH_LEN + 1500 {
                    continue;
                }
                let Some((frame, shape)) = capture::readdress(encap, &f.bytes) else {
                    continue;
                };
                if n == PER_ORIGIN || !shapes.insert(bucket(shape)) {
                    continue;
                }
                n += 1;
                std::fs::write(dir.join(format!("{origin}-{n:02}.frame")), &frame)?;
                let payload = &frame[frame.len() - udp_payload_len(&frame)..];
                let mut seed = codec_params();
                seed.extend_from_slice(payload);
                std::fs::write(seeds.join(format!("{name}-{origin}-{n:02}")), seed)?;
            }
            anyhow::ensure!(
                n > 0,
                "no {name} frame from {origin} was captured on h1's {UNDERLAY_IF}"
            );
            written += n;
            step(format!(
                "fuzz: {name}: {n} frames from {origin} (of {} captured)",
                frames.iter().filter(|f| f.outgoing == outgoing).count()
            ));
        }
        step(format!(
            "fuzz: {name}: {written} frames in {}",
            dir.display()
        ));
    }
    Ok(())
}

/// One format's frames on h1's underlay, h1 running the agent and h2, h3 the stand-ins.
fn capture_one(
    binary: &Path,
    encap: Encap,
    backend: flanneld::Backend,
) -> anyhow::Result<Vec<capture::Frame>> {
    let dir = std::env::temp_dir().join(format!("overlay-capture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let mut migration = Migration::flannel_cluster(Plan {
            prefix: PREFIX.into(),
            backend,
            agent_bin: binary.to_owned(),
            agent_flags: vec!["--datapath=ebpf".into()],
            rollback: false,
            dir: dir.clone(),
        })?;
        migration.to_agent(0)?;
        let hosts = &migration.cluster.lab.hosts;
        let view = |h: usize| {
            hosts[h]
                .container
                .as_ref()
                .expect("the cluster started it")
                .view()
        };
        let cap = Capture::start(&hosts[0].ns, UNDERLAY_IF, receive_cases::port(encap))?;
        // The ping flows run throughout; TCP adds full-sized segments, ACKs, SYNs and FINs.
        // A stream that fails costs the corpus its TCP frames, not the capture: said, not hidden.
        for (from, to, port) in [(1, 0, 21000), (0, 2, 21001)] {
            if let Err(e) = tcp_transfer(&view(from), &view(to), port, STREAM) {
                step(format!(
                    "fuzz: TCP h{}->h{} failed ({e}): the corpus lacks its segments",
                    from + 1,
                    to + 1
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(cap.stop()?)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Shapes that differ only in the length's low bits are one: the corpus needs each kind of
/// packet once, not every payload length.
fn bucket(s: Shape) -> Shape {
    Shape {
        inner_len: s.inner_len / 256,
        ..s
    }
}

/// The UDP payload's length of a re-addressed frame (its UDP length field minus the header).
fn udp_payload_len(frame: &[u8]) -> usize {
    let udp = wire::ETH_LEN + usize::from(frame[wire::ETH_LEN] & 0x0f) * 4;
    usize::from(u16::from_be_bytes([frame[udp + 4], frame[udp + 5]])) - wire::UDP_LEN
}

/// The codec target's 20 parameter bytes for the fuzzers' host: VNI (3), local MAC (6), peer
/// MAC (6), sender (4), ICMP code (1).
fn codec_params() -> Vec<u8> {
    let mut p = Vec::with_capacity(20);
    p.extend_from_slice(&VNI.to_be_bytes()[1..4]);
    p.extend_from_slice(&MY_VTEP);
    p.extend_from_slice(&PEER_VTEP);
    p.extend_from_slice(&PEER.octets());
    p.push(0);
    p
}

fn replace_dir(dir: &PathBuf) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
