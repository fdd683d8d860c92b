//! Every WGSL file parses and validates with naga (the compiler wgpu uses, same version), with no
//! optional capabilities, so a broken shader fails `cargo test` rather than a user's run.

use std::path::Path;

fn shader_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shader_validates_with_naga() {
    // The embedded sources: each shaders/NAME.wgsl with any shaders/common/ file it uses.
    let shaders = sddpm_gpu::ops::all_shaders();
    assert!(shaders.len() >= 8);
    let mut failures = Vec::new();
    for shader in shaders {
        let src = shader.source.to_string();
        let shown = format!("shaders/{}.wgsl (as embedded)", shader.name);
        let module = match naga::front::wgsl::parse_str(&src) {
            Ok(m) => m,
            Err(e) => {
                failures.push(e.emit_to_string_with_path(&src, &shown));
                continue;
            }
        };
        let mut validator =
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty());
        if let Err(e) = validator.validate(&module) {
            failures.push(e.emit_to_string_with_path(&src, &shown));
        }
        assert!(!module.entry_points.is_empty(), "{shown} has no entry point");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shader_is_embedded_and_documented() {
    let embedded: Vec<&str> = sddpm_gpu::ops::all_shaders().iter().map(|s| s.name).collect();
    for path in shader_files() {
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        assert!(embedded.contains(&stem.as_str()), "shaders/{stem}.wgsl is not owned by any op in src/ops/");
        let src = std::fs::read_to_string(&path).unwrap();
        assert!(
            src.starts_with(&format!("// {stem}.wgsl: ")),
            "shaders/{stem}.wgsl must open with a header comment stating its math and layout"
        );
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/ops/{stem}.rs")).exists(),
            "shaders/{stem}.wgsl needs its owner src/ops/{stem}.rs"
        );
    }
}

#[test]
fn a_broken_shader_is_caught() {
    // The check itself must be able to fail.
    let src = "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }";
    let module = naga::front::wgsl::parse_str(src);
    let failed = match module {
        Err(_) => true,
        Ok(m) => naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
            .validate(&m)
            .is_err(),
    };
    assert!(failed);
}
