//! The guard: every program the project's code spawns must be provided by a row of
//! [`REQUIREMENTS`], so a new spawn cannot pass CI on a machine that happens to have the program
//! and fail on a new one (as protoc's missing includes did).
//!
//! It reads the Rust sources of the agent, the tests and xtask, and finds programs where the
//! code names them:
//! - `Command::new("prog")`, or `Command::new(CONST)` with `const CONST: &str = "/usr/bin/prog"`;
//! - calls of the project's spawn helpers, found as the functions with a parameter named
//!   `program` (`netns::run("ip", ..)`, `ns.exec("sysctl", ..)`, `ns.spawn("etcd", ..)`), at
//!   that parameter's position;
//! - `ip netns exec <ns> prog ...` argument lists;
//! - `agent_bin = "prog"` (the cluster's agent command, replaced by setpriv in one test);
//! - cargo subcommands that are programs of their own (`cargo fmt` needs `cargo-fmt`).
//!
//! A `Command::new` whose program is none of these (a variable, a call) fails the guard unless
//! it is one of [`VARIABLE_SPAWNS`], each saying what it runs: a new helper must name its
//! parameter `program` or be listed there, so the guard cannot miss it silently.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use super::{Proof, REQUIREMENTS};

/// Programs the guard accepts without a row: what setup itself runs on, and cannot install.
const ALWAYS_PRESENT: &[(&str, &str)] = &[
    ("cargo", "the Rust toolchain setup runs with"),
    ("rustc", "the Rust toolchain setup runs with"),
    ("rustup", "the Rust toolchain setup runs with"),
    (
        "apt-get",
        "setup's installer (Debian's apt, Priority: required)",
    ),
];

/// `Command::new(<expression>)` sites whose program is not a literal: (file, expression as the
/// guard's tokens spell it, what it runs). Each runs the toolchain or the project's own binary.
const VARIABLE_SPAWNS: &[(&str, &str, &str)] = &[
    (
        "xtask/src/cmd.rs",
        "std::env::var_os(\"CARGO\").unwrap_or_else(||\"cargo\".into())",
        "the cargo running xtask",
    ),
    (
        "xtask/src/test.rs",
        "std::env::current_exe()?",
        "xtask itself",
    ),
    ("xtask/src/run.rs", "binary", "the agent xtask just built"),
    (
        "xtask/src/setup.rs",
        "std::env::var_os(\"PROTOC\").unwrap_or_else(||\"protoc\".into())",
        "protoc, as prost-build picks it (a row of its own)",
    ),
    ("tests/src/etcd.rs", "cargo", "the cargo running the tests"),
    (
        "tests/tests/docker.rs",
        "std::env::current_exe().unwrap()",
        "the test binary itself, as the run to be killed",
    ),
    (
        "tests/src/docker.rs",
        "agent_bin",
        "the agent the tests built (its docker-opts)",
    ),
    (
        "tests/src/etcd.rs",
        "agent_binary()",
        "the agent the tests built",
    ),
    (
        "tests/tests/control_plane.rs",
        "overlay_tests::etcd::agent_binary()",
        "the agent the tests built",
    ),
];

/// What the scan must find at least, so it cannot pass by finding nothing.
const MUST_FIND: &[&str] = &[
    "ip",
    "etcd",
    "etcdctl",
    "iperf3",
    "sockperf",
    "ping",
    "iptables",
    "setpriv",
    "curl",
    "bpftool",
    "sysctl",
    "mount",
    "systemd-analyze",
    "openssl",
    "cargo-fmt",
    "cargo-clippy",
    "cargo-fuzz",
];

/// Cargo's own commands (no `cargo-<name>` program behind them) that the code runs.
const CARGO_BUILTINS: &[&str] = &["build", "check", "install", "metadata", "run", "test"];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Ident(String),
    Punct(char),
}

/// Rust source as the tokens the guard needs: comments dropped, string literals whole, char
/// literals skipped, every other character a punctuation token. Each token with its line.
fn lex(src: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == '"' {
            let (text, end) = string(&chars, i + 1, 0);
            line += text.matches('\n').count();
            toks.push((Tok::Str(text), line));
            i = end;
        } else if c == '\'' {
            // A char literal ('a', '"', '\n'), else a lifetime or label.
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                toks.push((Tok::Punct('\''), line));
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // Raw strings: r"..", r#".."#, br#".."#.
            if (word == "r" || word == "br") && (at(i) == '"' || at(i) == '#') {
                let hashes = chars[i..].iter().take_while(|&&h| h == '#').count();
                if at(i + hashes) == '"' {
                    let (text, end) = string(&chars, i + hashes + 1, hashes);
                    line += text.matches('\n').count();
                    toks.push((Tok::Str(text), line));
                    i = end;
                    continue;
                }
            }
            toks.push((Tok::Ident(word), line));
        } else {
            toks.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    toks
}

/// The string literal starting at `i` (after its opening quote): its text and the index after it.
/// `hashes` > 0 for raw strings, which have no escapes.
fn string(chars: &[char], mut i: usize, hashes: usize) -> (String, usize) {
    let mut text = String::new();
    while i < chars.len() {
        let c = chars[i];
        if hashes == 0 && c == '\\' {
            if let Some(&next) = chars.get(i + 1) {
                text.push(next);
            }
            i += 2;
            continue;
        }
        if c == '"'
            && chars[i + 1..]
                .iter()
                .take(hashes)
                .filter(|&&h| h == '#')
                .count()
                == hashes
        {
            return (text, i + 1 + hashes);
        }
        text.push(c);
        i += 1;
    }
    (text, i)
}

/// A function whose parameter `program` names what it runs.
#[derive(Debug, Clone)]
struct Helper {
    name: String,
    /// Position of `program` among the arguments a call passes (`self` not counted).
    index: usize,
    method: bool,
}

/// Where a program is spawned.
#[derive(Debug, Clone, PartialEq)]
struct Spawn {
    program: String,
    file: String,
    line: usize,
}

/// The index of the bracket closing the one at `open`.
fn closing(toks: &[(Tok, usize)], open: usize) -> usize {
    let mut depth = 0i32;
    for (i, (t, _)) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// The top-level comma-separated arguments between the bracket at `open` and its closing one.
fn arguments(toks: &[(Tok, usize)], open: usize) -> Vec<&[(Tok, usize)]> {
    let close = closing(toks, open);
    let mut args = Vec::new();
    let (mut start, mut depth) = (open + 1, 0i32);
    for i in open + 1..close {
        match &toks[i].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => depth -= 1,
            Tok::Punct(',') if depth == 0 => {
                args.push(&toks[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < close {
        args.push(&toks[start..close]);
    }
    args
}

fn text(toks: &[(Tok, usize)]) -> String {
    toks.iter()
        .map(|(t, _)| match t {
            Tok::Str(s) => format!("{s:?}"),
            Tok::Ident(s) => s.clone(),
            Tok::Punct(c) => c.to_string(),
        })
        .collect()
}

fn ident(toks: &[(Tok, usize)], i: usize) -> Option<&str> {
    match toks.get(i) {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn punct(toks: &[(Tok, usize)], i: usize, c: char) -> bool {
    matches!(toks.get(i), Some((Tok::Punct(p), _)) if *p == c)
}

fn single_str(arg: &[(Tok, usize)]) -> Option<&str> {
    match arg {
        [(Tok::Str(s), _)] => Some(s),
        _ => None,
    }
}

/// Each `<keyword> NAME` (`fn f`, `const C`): the keyword's index and the name.
fn items<'a>(toks: &'a [(Tok, usize)], keyword: &'a str) -> impl Iterator<Item = (usize, &'a str)> {
    (0..toks.len()).filter_map(move |i| {
        (ident(toks, i) == Some(keyword))
            .then(|| ident(toks, i + 1))
            .flatten()
            .map(|name| (i, name))
    })
}

/// `const NAME: &str = "value";` (and `&'static str`) anywhere in the sources.
fn consts(toks: &[(Tok, usize)], into: &mut HashMap<String, String>) {
    for (i, name) in items(toks, "const") {
        let mut j = i + 2;
        while j < toks.len() && !punct(toks, j, '=') && !punct(toks, j, ';') {
            j += 1;
        }
        let ty = text(&toks[i + 2..j.min(toks.len())]);
        if (ty == ":&str" || ty == ":&'staticstr")
            && punct(toks, j, '=')
            && let Some((Tok::Str(value), _)) = toks.get(j + 1)
            && punct(toks, j + 2, ';')
        {
            into.insert(name.to_owned(), value.clone());
        }
    }
}

/// Functions with a parameter named `program`.
fn helpers(toks: &[(Tok, usize)], into: &mut Vec<Helper>) {
    for (i, name) in items(toks, "fn") {
        let mut open = i + 2;
        if punct(toks, open, '<') {
            // Generics: skip to the matching '>' ('->' inside is no bracket).
            let mut depth = 0i32;
            while open < toks.len() {
                match &toks[open].0 {
                    Tok::Punct('<') => depth += 1,
                    Tok::Punct('>') if !punct(toks, open - 1, '-') => depth -= 1,
                    _ => {}
                }
                open += 1;
                if depth == 0 {
                    break;
                }
            }
        }
        if !punct(toks, open, '(') {
            continue;
        }
        // Only functions that spawn: `program` also names eBPF programs (link_path, AttachSite).
        let close = closing(toks, open);
        let body_open = (close..toks.len())
            .find(|&j| punct(toks, j, '{') || punct(toks, j, ';'))
            .filter(|&j| punct(toks, j, '{'));
        let spawns = body_open.is_some_and(|b| {
            toks[b..closing(toks, b)]
                .iter()
                .any(|(t, _)| *t == Tok::Ident("Command".into()) || *t == Tok::Str("exec".into()))
        });
        if !spawns {
            continue;
        }
        let params = arguments(toks, open);
        let method = params
            .first()
            .is_some_and(|p| p.iter().any(|(t, _)| *t == Tok::Ident("self".into())));
        let skip = usize::from(method);
        if let Some(index) = params.iter().skip(skip).position(
            |p| matches!(p, [(Tok::Ident(n), _), (Tok::Punct(':'), _), ..] if n == "program"),
        ) {
            into.push(Helper {
                name: name.to_owned(),
                index,
                method,
            });
        }
    }
}

/// After a cargo command starting at `from`: the program behind its subcommand when that is not
/// one of cargo's own (`fmt` -> `cargo-fmt`), from the first `.arg(..)`/`.args(..)` of the same
/// statement.
fn cargo_subcommand(toks: &[(Tok, usize)], from: usize) -> Option<String> {
    let mut depth = 0i32;
    let mut i = from;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            Tok::Punct(';') if depth == 0 => return None,
            Tok::Punct('.')
                if matches!(ident(toks, i + 1), Some("arg" | "args"))
                    && punct(toks, i + 2, '(') =>
            {
                let close = closing(toks, i + 2);
                let sub = toks[i + 2..close].iter().find_map(|(t, _)| match t {
                    Tok::Str(s) if !s.starts_with(['-', '+']) => Some(s.clone()),
                    _ => None,
                })?;
                return (!CARGO_BUILTINS.contains(&sub.as_str())).then(|| format!("cargo-{sub}"));
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn basename(program: &str) -> String {
    program.rsplit('/').next().unwrap_or(program).to_owned()
}

/// The spawns in one file, and the `Command::new` sites whose program the guard cannot read.
fn spawns(
    file: &str,
    toks: &[(Tok, usize)],
    consts: &HashMap<String, String>,
    helpers: &[Helper],
) -> (Vec<Spawn>, Vec<String>) {
    let (mut found, mut unreadable) = (Vec::new(), Vec::new());
    let mut add = |program: &str, line: usize| {
        found.push(Spawn {
            program: basename(program),
            file: file.to_owned(),
            line,
        });
    };
    for i in 0..toks.len() {
        let line = toks[i].1;
        // Command::new(..)
        if ident(toks, i) == Some("Command")
            && punct(toks, i + 1, ':')
            && punct(toks, i + 2, ':')
            && ident(toks, i + 3) == Some("new")
            && punct(toks, i + 4, '(')
        {
            let args = arguments(toks, i + 4);
            let arg = args.first().copied().unwrap_or_default();
            let program = match arg {
                [(Tok::Str(s), _)] => Some(s.clone()),
                [(Tok::Ident(name), _)] if consts.contains_key(name) => Some(consts[name].clone()),
                [(Tok::Ident(name), _)] if name == "program" => None,
                _ => {
                    let expr = text(arg);
                    if !VARIABLE_SPAWNS
                        .iter()
                        .any(|(f, e, _)| *f == file && *e == expr)
                    {
                        unreadable.push(format!("{file}:{line}: Command::new({expr})"));
                    }
                    None
                }
            };
            if let Some(program) = program {
                add(&program, line);
                if basename(&program) == "cargo"
                    && let Some(sub) = cargo_subcommand(toks, closing(toks, i + 4) + 1)
                {
                    add(&sub, line);
                }
            }
        }
        // cargo() from xtask's cmd.rs: a Command for the running cargo.
        if ident(toks, i) == Some("cargo")
            && punct(toks, i + 1, '(')
            && punct(toks, i + 2, ')')
            && !punct(toks, i.wrapping_sub(1), '.')
            && ident(toks, i.wrapping_sub(1)) != Some("fn")
            && let Some(sub) = cargo_subcommand(toks, i + 3)
        {
            add(&sub, line);
        }
        // Calls of helpers taking `program`.
        if let Some(name) = ident(toks, i)
            && punct(toks, i + 1, '(')
            && ident(toks, i.wrapping_sub(1)) != Some("fn")
        {
            let after_dot = punct(toks, i.wrapping_sub(1), '.');
            for h in helpers
                .iter()
                .filter(|h| h.name == name && h.method == after_dot)
            {
                if let Some(program) = arguments(toks, i + 1)
                    .get(h.index)
                    .and_then(|a| single_str(a))
                {
                    add(program, line);
                }
            }
        }
        // `ip netns exec <ns> prog`: "exec", <expression>, "prog"
        if toks[i].0 == Tok::Str("exec".into()) && punct(toks, i + 1, ',') {
            let mut j = i + 2;
            let mut depth = 0i32;
            while j < toks.len() {
                match &toks[j].0 {
                    Tok::Punct('(' | '[' | '{') => depth += 1,
                    Tok::Punct(')' | ']' | '}') => depth -= 1,
                    Tok::Punct(',') if depth == 0 => break,
                    _ => {}
                }
                if depth < 0 {
                    break;
                }
                j += 1;
            }
            if punct(toks, j, ',')
                && let Some((Tok::Str(program), _)) = toks.get(j + 1)
            {
                add(program, line);
            }
        }
        // agent_bin = "prog"
        if ident(toks, i).is_some_and(|n| n.ends_with("_bin"))
            && punct(toks, i + 1, '=')
            && !punct(toks, i + 2, '=')
            && let Some((Tok::Str(program), _)) = toks.get(i + 2)
        {
            add(program, line);
        }
    }
    (found, unreadable)
}

/// Scans `(file, source)` pairs: the spawns found, and the sites the guard cannot read.
fn scan(sources: &[(String, String)]) -> (Vec<Spawn>, Vec<String>) {
    let lexed: Vec<(&str, Vec<(Tok, usize)>)> =
        sources.iter().map(|(f, s)| (f.as_str(), lex(s))).collect();
    let (mut all_consts, mut all_helpers) = (HashMap::new(), Vec::new());
    for (_, toks) in &lexed {
        consts(toks, &mut all_consts);
        helpers(toks, &mut all_helpers);
    }
    let (mut found, mut unreadable) = (Vec::new(), Vec::new());
    for (file, toks) in &lexed {
        let (f, u) = spawns(file, toks, &all_consts, &all_helpers);
        found.extend(f);
        unreadable.extend(u);
    }
    (found, unreadable)
}

/// Spawns of programs no requirement provides, as messages.
fn unprovided(found: &[Spawn]) -> Vec<String> {
    let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in found {
        let provided = REQUIREMENTS
            .iter()
            .any(|r| r.programs.contains(&s.program.as_str()))
            || ALWAYS_PRESENT.iter().any(|(p, _)| *p == s.program);
        if !provided {
            missing
                .entry(&s.program)
                .or_default()
                .push(format!("{}:{}", s.file, s.line));
        }
    }
    missing
        .into_iter()
        .map(|(program, at)| {
            format!(
                "`{program}` (spawned at {}) is provided by no row of setup::REQUIREMENTS: add \
                 one (requirement -> Debian package or cargo install -> how setup proves it)",
                at.join(", ")
            )
        })
        .collect()
}

/// The Rust files of the agent, the tests and xtask, relative to the workspace root.
fn project_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = crate::cmd::workspace_root();
    let mut files = Vec::new();
    for dir in [
        "overlay-agent/src",
        "overlay-agent/build.rs",
        "tests",
        "xtask/src",
    ] {
        let path = root.join(dir);
        if path.is_dir() {
            walk(&path, &mut files);
        } else {
            files.push(path);
        }
    }
    files
        .into_iter()
        .map(|path| {
            let source = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rel = path.strip_prefix(&root).expect("under the root");
            (rel.to_string_lossy().into_owned(), source)
        })
        .collect()
}

#[test]
fn setup_provides_every_program_the_code_spawns() {
    let (found, unreadable) = scan(&project_sources());
    assert!(
        unreadable.is_empty(),
        "spawns whose program the guard cannot read: name the helper's parameter `program`, or \
         list the site in VARIABLE_SPAWNS with what it runs:\n{}",
        unreadable.join("\n")
    );
    let problems = unprovided(&found);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let names: Vec<&str> = found.iter().map(|s| s.program.as_str()).collect();
    let not_found: Vec<&&str> = MUST_FIND.iter().filter(|p| !names.contains(p)).collect();
    assert!(
        not_found.is_empty(),
        "the scan missed {not_found:?}, which the code spawns: it no longer reads the code's \
         spawns (found {names:?})"
    );
}

#[test]
fn the_scan_reads_each_way_the_code_spawns_and_flags_the_unprovided() {
    let source = r##"
        const TOOL: &str = "/usr/bin/frobnicate";
        pub fn run(program: &str, args: &[&str]) { Command::new(program).args(args); }
        impl Ns { fn exec(&self, program: &str) { run("ip", &["netns", "exec", &self.n, program]) } }
        fn client(ns: &Ns, program: &str) { Command::new("ip").arg(program); }
        fn link_path(&self, program: &str) -> PathBuf { self.dir.join(program) }
        fn f(ns: &Ns, c: &mut Cluster) {
            // Command::new("in-a-comment") is not a spawn.
            let s = "Command::new(\"in-a-string\")";
            std::process::Command::new("literal-prog").arg("x");
            Command::new(TOOL);
            run("helper-prog", &[]);
            ns.exec("method-prog", &['"', 'x']);
            client(ns, "indexed-prog");
            pins.link_path("not-a-spawn");
            Command::new("ip").args(["netns", "exec", ns.name(), "in-netns", r#"raw"#]);
            c.agent_bin = "bin-prog".into();
            run(cargo().current_dir(&root).args(["fmt", "--check"]));
            Command::new("cargo").env_remove("CARGO").args(["+nightly", "fuzz", "run"]);
            cargo().args(["test", "--workspace"]);
            Command::new(unknown_variable);
        }
    "##;
    let (found, unreadable) = scan(&[("sample.rs".into(), source.into())]);
    let mut names: Vec<&str> = found.iter().map(|s| s.program.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        [
            "bin-prog",
            "cargo",
            "cargo-fmt",
            "cargo-fuzz",
            "frobnicate",
            "helper-prog",
            "in-netns",
            "indexed-prog",
            "ip",
            "literal-prog",
            "method-prog",
        ]
    );
    assert_eq!(unreadable, ["sample.rs:21: Command::new(unknown_variable)"]);
    let problems = unprovided(&found);
    assert_eq!(problems.len(), 7, "all but ip and cargo's: {problems:#?}");
    assert!(problems[0].starts_with("`bin-prog` (spawned at sample.rs:17)"));
}

#[test]
fn each_runs_proof_runs_a_program_of_its_row() {
    for r in REQUIREMENTS {
        if let Proof::Runs(program, _) = r.proof {
            assert!(
                r.programs.contains(&program),
                "{}: proved by running {program}, which it does not list",
                r.what
            );
        }
    }
}
