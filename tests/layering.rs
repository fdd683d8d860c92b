//! The layer order written in src/lib.rs holds: no module in src/ uses a module of its own layer or
//! above. Paths are read from the source text (`crate::x`, `$crate::x`, `crate::{x, y::z}`, and
//! `sddpm_gpu::x` in the binary), with comments and string literals removed first; a macro
//! (`crate::shader!`) counts as a use of the module that defines it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of every top-level module, from src/lib.rs's `//! - N `a`, `b`: what` lines (a
/// line's module names are the backquoted ones before its first `:`).
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! - ") else { continue };
        let Some((num, rest)) = rest.split_once(' ') else { continue };
        let Ok(layer) = num.parse::<usize>() else { continue };
        let names = rest.split(':').next().unwrap_or("");
        for name in names.split('`').skip(1).step_by(2) {
            assert!(out.insert(name.to_string(), layer).is_none(), "src/lib.rs lists `{name}` in two layers");
        }
    }
    out
}

/// The module a file of src/ belongs to (src/x.rs and src/x/...: x; the binary, src/main.rs and
/// src/cli/: cli), or None for src/lib.rs, which only declares the modules.
fn owner(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    match name {
        "lib" => None,
        "main" => Some("cli".into()),
        _ => Some(name.into()),
    }
}

/// `src` with comments removed and string and character literals emptied (their quotes kept), so
/// that only code is searched for paths.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r' && (i == 0 || !ident(c[i - 1])) && matches!(next, Some('"') | Some('#')) {
            // A raw string r"..." or r#"..."#: ends at a quote followed by as many #.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() && !(c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#'))) {
                j += 1;
            }
            out.push_str("\"\"");
            i = j + 1 + hashes;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i += 1;
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A character literal ('x', '\n', '\''); a lifetime ('a) has no closing quote.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            out.push_str("' '");
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The identifier at the start of `s`.
fn ident_at(s: &str) -> &str {
    let end = s.find(|ch: char| !(ch.is_alphanumeric() || ch == '_')).unwrap_or(s.len());
    &s[..end]
}

/// Top-level modules that `code` (see [`code_only`]) refers to through `root::` paths; `macros`
/// maps a macro's name to the module that defines it.
fn uses(code: &str, roots: &[&str], macros: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for root in roots {
        let pat = format!("{root}::");
        for (at, _) in code.match_indices(&pat) {
            // `crate::` inside `$crate::` or `my_crate::` is another path; `$crate` is its own root.
            let before = code[..at].chars().next_back();
            if before.is_some_and(|ch| ch.is_alphanumeric() || ch == '_' || (ch == '$' && *root != "$crate")) {
                continue;
            }
            let rest = &code[at + pat.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the first name of every item at depth 1.
                let (mut depth, mut start) = (1, true);
                for (k, ch) in group.char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        ',' if depth == 1 => start = true,
                        ch if start && depth == 1 && (ch.is_alphanumeric() || ch == '_') => {
                            let name = ident_at(&group[k..]);
                            out.insert(macros.get(name).cloned().unwrap_or_else(|| name.to_string()));
                            start = false;
                        }
                        _ => {}
                    }
                }
                continue;
            }
            // An exported macro sits at the crate root (`crate::shader!`, `use crate::shader;`):
            // it stands for the module that defines it.
            let name = ident_at(rest);
            if let Some(m) = macros.get(name) {
                out.insert(m.clone());
            } else if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Every use in `files` (path relative to src/, source) of a module not below the user's layer,
/// or of a module the layer list does not name, one line each.
fn violations(layers: &BTreeMap<String, usize>, files: &[(PathBuf, String)]) -> Vec<String> {
    let mut macros = BTreeMap::new();
    for (rel, src) in files {
        let Some(module) = owner(rel) else { continue };
        for (at, _) in src.match_indices("macro_rules!") {
            let name = ident_at(src[at + "macro_rules!".len()..].trim_start());
            macros.insert(name.to_string(), module.clone());
        }
    }
    let mut out = Vec::new();
    for (rel, src) in files {
        let Some(module) = owner(rel) else { continue };
        let Some(&mine) = layers.get(&module) else {
            out.push(format!("src/{}: module `{module}` is in no layer of src/lib.rs", rel.display()));
            continue;
        };
        let roots: &[&str] = if module == "cli" { &["crate", "$crate", "sddpm_gpu"] } else { &["crate", "$crate"] };
        for used in uses(&code_only(src), roots, &macros) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                None => out.push(format!("src/{}: uses `{used}`, which is in no layer of src/lib.rs", rel.display())),
                Some(&theirs) if theirs >= mine => out.push(format!(
                    "src/{}: `{module}` (layer {mine}) uses `{used}` (layer {theirs}); move the shared piece down",
                    rel.display()
                )),
                Some(_) => {}
            }
        }
    }
    out
}

fn sources(dir: &Path, base: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path.strip_prefix(base).unwrap().to_path_buf(), text));
        }
    }
}

#[test]
fn every_arrow_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let layers = layers(&lib);
    // The list names exactly the library's modules, plus the binary.
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(String::from)
        .chain(["cli".to_string()])
        .collect();
    let listed: BTreeSet<String> = layers.keys().cloned().collect();
    assert_eq!(listed, declared, "src/lib.rs's layer list must name every module (and `cli`) once");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    let problems = violations(&layers, &files);
    assert!(problems.is_empty(), "imports that point up or sideways:\n{}", problems.join("\n"));
    // Not vacuous: the paths were found (a parser that saw none would pass any tree).
    let macros = BTreeMap::new();
    let arrows: usize = files
        .iter()
        .filter(|(rel, _)| owner(rel).is_some())
        .map(|(_, s)| uses(&code_only(s), &["crate", "sddpm_gpu"], &macros).len())
        .sum();
    assert!(arrows > 60, "only {arrows} module uses found in src/: the path parser is broken");
}

#[test]
fn an_import_that_points_up_or_sideways_is_caught() {
    let layers = layers("//! - 2 `model`: up\n//! - 1 `ops`, `tune`: middle\n//! - 0 `gpu`: bottom\n");
    assert_eq!(layers.len(), 4);
    let check = |file: &str, src: &str| violations(&layers, &[(PathBuf::from(file), src.to_string())]);
    // Down: fine, in every spelling.
    assert!(check("model/net.rs", "use crate::ops::conv;\nfn f() { crate::gpu::Context::new(None); }").is_empty());
    assert!(check("ops/x.rs", "use crate::{gpu::{self, Context}};").is_empty());
    // Up, as a use, a grouped use (not its first item), a path in an expression and a type.
    assert_eq!(check("gpu/context.rs", "use crate::model::Net;").len(), 1);
    assert_eq!(check("gpu/context.rs", "use crate::{gpu, model::{Net, Arch}};").len(), 1);
    assert_eq!(check("gpu.rs", "fn f() { let n = crate::model::build(); }").len(), 1);
    assert_eq!(check("ops/a.rs", "fn f(x: &crate::model::Net) {}").len(), 1);
    // Sideways, within one layer.
    let side = check("ops/a.rs", "use crate::tune::tuning;");
    assert!(side[0].contains("`ops` (layer 1) uses `tune` (layer 1)"), "{side:?}");
    // A module missing from the list, used or using.
    assert_eq!(check("ops/a.rs", "use crate::nowhere::X;").len(), 1);
    assert_eq!(check("nowhere.rs", "use crate::gpu::Context;").len(), 1);
    // Comments and strings are not code; a lifetime is not a character literal.
    let quiet = "// crate::model::Net\n/* crate::model /* nested */ crate::model */\n\
                 fn f<'a>(s: &'a str) -> &'a str { let _ = \"crate::model\"; let _ = r#\"crate::model\"#; let _ = '\"'; s }";
    assert!(check("gpu.rs", quiet).is_empty(), "{:?}", check("gpu.rs", quiet));
    // Code after a lifetime and a char literal is still read.
    assert_eq!(check("gpu.rs", "fn f<'a>(c: char) -> bool { c == 'x' && crate::model::ok() }").len(), 1);
    // A macro counts as its defining module; the binary's `sddpm_gpu::` paths are read too.
    let files = vec![
        (PathBuf::from("model/m.rs"), "macro_rules! shader { () => {} }".to_string()),
        (PathBuf::from("ops/a.rs"), "fn f() { crate::shader!(); }".to_string()),
        (PathBuf::from("ops/b.rs"), "use crate::shader;".to_string()),
        (PathBuf::from("ops/c.rs"), "use crate::{shader, gpu};".to_string()),
    ];
    assert_eq!(violations(&layers, &files).len(), 3, "{:?}", violations(&layers, &files));
    let bin = layers_with_cli();
    let v = violations(&bin, &[(PathBuf::from("main.rs"), "use sddpm_gpu::gpu;".into())]);
    assert!(v.is_empty(), "{v:?}");
    let v = violations(&bin, &[(PathBuf::from("gpu.rs"), "use sddpm_gpu::cli;".into())]);
    assert!(v.is_empty(), "the library's own `sddpm_gpu::` is not a path inside the library: {v:?}");
    let v = violations(&bin, &[(PathBuf::from("cli/x.rs"), "use crate::cli::y; use sddpm_gpu::gpu;".into())]);
    assert!(v.is_empty(), "{v:?}");
}

fn layers_with_cli() -> BTreeMap<String, usize> {
    layers("//! - 1 `cli`: binary\n//! - 0 `gpu`: device\n")
}
