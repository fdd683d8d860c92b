//! The documentation holds together: the README's first screen gives the two commands that work,
//! every design page in docs/ is linked from the README and from a module doc comment in src/,
//! and every relative link in the README and docs/ names a file that exists.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Markdown link targets `](target)` of `text`, without their `#anchor`, that are not URLs.
fn relative_links(text: &str) -> Vec<String> {
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')')?];
            let file = target.split('#').next().unwrap_or("");
            (!file.is_empty() && !file.contains("://")).then(|| file.to_string())
        })
        .collect()
}

fn module_docs(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            module_docs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            for line in read(&path).lines().filter(|l| l.starts_with("//!")) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

#[test]
fn the_first_screen_gives_the_two_commands() {
    let readme = read(&root().join("README.md"));
    let screen: Vec<&str> = readme.lines().take(24).collect();
    for cmd in ["cargo run --release -- train", "cargo test --release"] {
        assert!(screen.iter().any(|l| l.starts_with(cmd)), "README.md's first 24 lines lack `{cmd}`");
    }
}

#[test]
fn every_design_page_is_linked_from_the_readme_and_its_module() {
    let readme = read(&root().join("README.md"));
    let mut docs = String::new();
    module_docs(&root().join("src"), &mut docs);
    let mut pages: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".md"))
        .collect();
    pages.sort();
    assert!(pages.len() >= 4, "docs/ holds {pages:?}");
    for page in &pages {
        let path = format!("docs/{page}");
        assert!(relative_links(&readme).contains(&path), "README.md does not link {path}");
        assert!(docs.contains(&path), "no module doc comment in src/ points to {path}");
    }
}

#[test]
fn relative_links_name_files_that_exist() {
    let mut files = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut checked = 0;
    for file in &files {
        let dir = file.parent().unwrap();
        for link in relative_links(&read(file)) {
            assert!(dir.join(&link).exists(), "{}: link to {link}, which does not exist", file.display());
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} relative links found: the link parser is broken");
    assert_eq!(relative_links("[a](docs/x.md#y) [b](https://e.com) [c](#z)"), vec!["docs/x.md".to_string()]);
}
