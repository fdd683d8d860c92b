//! Every WGSL file parses and validates with naga (the compiler wgpu uses, same version), with the
//! capabilities the device may enable (f16, subgroups and cooperative matrices when the adapter
//! has them: see gpu::WANTED_FEATURES), so a broken shader fails `cargo test` rather than a user's
//! run (the cooperative-matrix modules of every shape included, though no adapter here runs the
//! 16x16 ones).

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

/// What wgpu lets shaders use on a device with every feature of gpu::WANTED_FEATURES.
fn device_capabilities() -> naga::valid::Capabilities {
    use naga::valid::Capabilities as C;
    C::SHADER_FLOAT16 | C::SUBGROUP | C::SUBGROUP_BARRIER | C::COOPERATIVE_MATRIX
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
        let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), device_capabilities());
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

// ---- uniform parameter structs ------------------------------------------------------------------

/// (member name, byte offset) of struct `name` in `src` as naga lays it out, and its size.
fn wgsl_struct_layout(src: &str, name: &str) -> (Vec<(String, u32)>, u32) {
    let module = naga::front::wgsl::parse_str(src).unwrap();
    for (_, ty) in module.types.iter() {
        if ty.name.as_deref() == Some(name) {
            if let naga::TypeInner::Struct { members, span } = &ty.inner {
                let m = members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset)).collect();
                return (m, *span);
            }
        }
    }
    panic!("no struct {name} in the shader");
}

/// Whether Rust members (name, offset) and size agree with WGSL struct `name` in `src`.
fn check_layout(src: &str, name: &str, rust: &[(String, u32)], size: u32) -> Result<(), String> {
    let (wgsl, span) = wgsl_struct_layout(src, name);
    for (field, offset) in rust {
        let w = wgsl.iter().find(|(n, _)| n == field).map(|w| w.1);
        if w != Some(*offset) {
            return Err(format!("{name}.{field} at {offset} in Rust, WGSL {wgsl:?}"));
        }
    }
    if size != span {
        return Err(format!("{name}: {size} bytes in Rust, {span} in WGSL"));
    }
    Ok(())
}

/// The Rust #[repr(C)] parameter struct of a shader entry must have the named WGSL members at the
/// same offsets and the same size (padding members may be grouped differently).
macro_rules! assert_params_layout {
    ($shader:expr, $wgsl:literal, $rust:ty, [$($field:ident),*]) => {{
        let rust: Vec<(String, u32)> =
            vec![$((stringify!($field).to_string(), std::mem::offset_of!($rust, $field) as u32)),*];
        let size = std::mem::size_of::<$rust>() as u32;
        if let Err(e) = check_layout($shader.source, $wgsl, &rust, size) {
            panic!("{e}");
        }
        ($shader.name, $wgsl)
    }};
}

#[test]
fn parameter_structs_match_their_wgsl_layout() {
    use sddpm_gpu::ops::{
        attention, batchnorm, calibrate, conv, conv_subgroup, dropout, elementwise, embedding, groupnorm, layout,
        matmul, neuron, optim, pool, readout, reduce, resize, sampler, spike_attention,
    };
    let mut checked = std::collections::BTreeSet::new();
    checked.insert(assert_params_layout!(calibrate::SHADER, "FmaParams", calibrate::FmaParams, [n, iters, a, b]));
    checked.insert(assert_params_layout!(
        calibrate::SHADER,
        "CopyParams",
        calibrate::CopyParams,
        [n, pad0, pad1, pad2]
    ));
    checked.insert(assert_params_layout!(
        conv::SHADER,
        "Params",
        conv::ConvParams,
        [n, cin, h, w, cout, ho, wo, k, stride, pad, wo_groups, x_spikes, kw, pad_w, epilogue, emb_rows]
    ));
    checked.insert(assert_params_layout!(
        matmul::SHADER,
        "Params",
        matmul::MatmulParams,
        [m, n, k, has_bias, a_sm, a_sk, b_sk, b_sn]
    ));
    // Its cooperative-matrix variants bind matmul's parameter words (every instance).
    for shader in &sddpm_gpu::ops::coop_matmul::SHADERS {
        checked.insert(assert_params_layout!(
            shader,
            "Params",
            matmul::MatmulParams,
            [m, n, k, has_bias, a_sm, a_sk, b_sk, b_sn]
        ));
    }
    checked.insert(assert_params_layout!(
        elementwise::SHADER,
        "Params",
        elementwise::ElementwiseParams,
        [numel, c, s, b]
    ));
    checked.insert(assert_params_layout!(
        layout::SHADER,
        "Params",
        layout::LayoutParams,
        [numel, c, h, w, ca, cb, s, _pad]
    ));
    checked.insert(assert_params_layout!(reduce::SHADER, "Params", reduce::ReduceParams, [n, c, s, b]));
    checked.insert(assert_params_layout!(
        optim::SHADER,
        "Params",
        optim::OptimParams,
        [n, _pad0, _pad1, _pad2, beta1, beta2, eps, _pad3]
    ));
    checked.insert(assert_params_layout!(
        sampler::SHADER,
        "Params",
        sampler::SamplerParams,
        [numel, per_image, batch, image_base, seed_lo, seed_hi, z_source, _pad]
    ));
    checked.insert(assert_params_layout!(embedding::SHADER, "Params", embedding::GatherParams, [rows, d, count, _pad]));
    checked.insert(assert_params_layout!(readout::SHADER, "Params", readout::ReadoutParams, [m, t, decay, _pad]));
    checked.insert(assert_params_layout!(
        dropout::SHADER,
        "Params",
        dropout::DropoutParams,
        [numel, layer, threshold, _pad, scale, _pad1, _pad2, _pad3]
    ));
    checked.insert(assert_params_layout!(
        groupnorm::SHADER,
        "Params",
        groupnorm::GroupNormParams,
        [b, c, s, groups, eps, swish, _pad1, _pad2]
    ));
    checked.insert(assert_params_layout!(
        attention::SHADER,
        "Params",
        attention::AttentionParams,
        [b, c, n, _pad, scale, _pad1, _pad2, _pad3]
    ));
    checked.insert(assert_params_layout!(
        spike_attention::SHADER,
        "Params",
        spike_attention::SpikeAttentionParams,
        [rows, c, n, heads, d, scale, _pad0, _pad1]
    ));
    checked.insert(assert_params_layout!(
        pool::SHADER,
        "Params",
        pool::PoolParams,
        [numel, h, w, ho, wo, kh, kw, stride, pad, _p0, _p1, _p2]
    ));
    checked.insert(assert_params_layout!(
        resize::SHADER,
        "Params",
        resize::ResizeParams,
        [numel, cin, h, w, cout, ho, wo, scale_h, scale_w, mul, add, _p0]
    ));
    checked.insert(assert_params_layout!(
        batchnorm::SHADER,
        "Params",
        batchnorm::BatchnormParams,
        [n, c, hw, groups, eps, momentum, batch, slices]
    ));
    checked.insert(assert_params_layout!(
        neuron::SHADER,
        "Params",
        neuron::NeuronParams,
        [n, t, lif, bn_groups, v_th, v_reset, inv_tau, c, hw, b, has_emb]
    ));
    checked.insert(assert_params_layout!(
        conv_subgroup::SHADER,
        "Params",
        conv::ConvParams,
        [n, cin, h, w, cout, ho, wo, k, stride, pad, wo_groups, x_spikes, kw, pad_w, epilogue, emb_rows]
    ));
    // Every uniform struct of every embedded shader has its Rust mirror checked above.
    for shader in sddpm_gpu::ops::all_shaders() {
        let module = naga::front::wgsl::parse_str(shader.source).unwrap();
        for (_, var) in module.global_variables.iter() {
            if var.space == naga::AddressSpace::Uniform {
                let ty = module.types[var.ty].name.clone().unwrap_or_default();
                assert!(
                    checked.contains(&(shader.name, ty.as_str())),
                    "shaders/{}.wgsl's uniform struct {ty} has no Rust parameter struct checked here",
                    shader.name
                );
            }
        }
    }
}

#[test]
fn a_parameter_struct_mismatch_is_caught() {
    // The check itself must be able to fail: members swapped, or a struct of the wrong size.
    let src = sddpm_gpu::ops::calibrate::SHADER.source;
    let swapped = [("n".to_string(), 0), ("iters".to_string(), 8), ("a".to_string(), 4), ("b".to_string(), 12)];
    assert!(check_layout(src, "FmaParams", &swapped, 16).is_err());
    assert!(check_layout(src, "FmaParams", &[("n".to_string(), 0)], 12).is_err());
}

#[test]
fn conv_subgroup_params_match_conv() {
    // conv_subgroup.wgsl is a variant of conv's weight gradient bound with conv's parameter words.
    use sddpm_gpu::ops::{conv, conv_subgroup};
    assert_eq!(
        wgsl_struct_layout(conv_subgroup::SHADER.source, "Params"),
        wgsl_struct_layout(conv::SHADER.source, "Params")
    );
}

/// The helper functions (not entry points) of a WGSL source: name and body, whitespace collapsed.
fn helpers(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = src.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("fn ") else { continue };
        // An entry point carries @compute on its own line above or before `fn` on the same line.
        let above = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).copied().unwrap_or("");
        if above.contains("@compute") || above.contains("@workgroup_size") {
            continue;
        }
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // The body: from this line to the brace that closes the function.
        let (mut depth, mut body, mut opened) = (0i32, String::new(), false);
        for l in &lines[i..] {
            body.push_str(l.trim());
            body.push(' ');
            depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
            opened |= l.contains('{');
            if opened && depth <= 0 {
                break;
            }
        }
        out.push((name, body));
    }
    out
}

/// Files that define the same helper, word for word: name -> files.
fn repeated_helpers(files: &[(String, String)]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut by_body: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for (file, src) in files {
        for (name, body) in helpers(src) {
            by_body.entry((name, body)).or_default().push(file.clone());
        }
    }
    by_body.into_iter().filter(|(_, f)| f.len() > 1).map(|((name, _), f)| (name, f)).collect()
}

/// Helpers still repeated in files other work is rewriting now; each goes when that work lands
/// (the test fails once an entry is no longer repeated, so the list only shrinks).
const STILL_REPEATED: &[(&str, &[&str])] = &[
    // The BatchNorm-groups work edits batchnorm and neuron: `uses "index"` there.
    ("flat_index", &["batchnorm.wgsl", "common/index.wgsl", "neuron.wgsl"]),
    // The convolution rewrite replaces both.
    ("x_saved_at", &["conv.wgsl", "conv_subgroup.wgsl"]),
];

#[test]
fn no_shader_repeats_a_helper_another_has() {
    let mut files = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for sub in [dir.clone(), dir.join("common")] {
        for e in std::fs::read_dir(&sub).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "wgsl") {
                let name = p.strip_prefix(&dir).unwrap().display().to_string();
                files.push((name, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let helpers_seen: usize = files.iter().map(|(_, s)| helpers(s).len()).sum();
    assert!(helpers_seen > 40, "only {helpers_seen} helper functions found: the parser is broken");
    let mut repeated = repeated_helpers(&files);
    for (name, known) in STILL_REPEATED {
        let mut files = repeated.remove(*name).unwrap_or_default();
        let mut known: Vec<String> = known.iter().map(|s| s.to_string()).collect();
        known.sort();
        files.sort();
        assert_eq!(files, known, "`{name}` is repeated in other files than STILL_REPEATED says; update the list");
    }
    assert!(repeated.is_empty(), "helpers written twice (put each in shaders/common/ and `uses` it): {repeated:?}");
}

#[test]
fn a_repeated_helper_is_caught() {
    let f = "fn flat(a: u32) -> u32 {\n    return a * 2u;\n}\n";
    let entry = "@compute @workgroup_size(1)\nfn flat(a: u32) -> u32 {\n    return a * 2u;\n}\n";
    let other = "fn flat(a: u32) -> u32 {\n    return a * 3u;\n}\n";
    let files = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
    assert_eq!(repeated_helpers(&files(&[("a", f), ("b", f)])).len(), 1);
    // An entry point of the same name and a different helper of the same name are not repeats.
    assert!(repeated_helpers(&files(&[("a", f), ("b", entry)])).is_empty());
    assert!(repeated_helpers(&files(&[("a", f), ("b", other)])).is_empty());
}
