//! FID and KID statistics against numbers numpy/scipy computed the way pytorch-fid and
//! torch-fidelity do (tools/fid_stats_fixture.py wrote tests/fixtures/fid), and pytorch-fid's
//! `.npz` statistics files.

mod common;

use common::tmp;
use sddpm_gpu::fid::{self, npz, Stats};

fn fixture(name: &str) -> std::path::PathBuf {
    common::fixture("fid").join(name)
}

fn features(key: &str) -> (Vec<f32>, usize) {
    let (shape, data) = npz::read_array(&fixture("features.npz"), key).unwrap();
    (data.iter().map(|&v| v as f32).collect(), shape[1])
}

fn stats(key: &str) -> Stats {
    let (f, d) = features(key);
    Stats::from_features(f, d).unwrap()
}

fn expected(key: &str) -> f64 {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key].as_f64().unwrap()
}

fn assert_rel(what: &str, got: f64, want: f64, rtol: f64) {
    assert!((got - want).abs() <= rtol * want.abs(), "{what}: got {got}, want {want} (rtol {rtol:e})");
}

#[test]
fn fid_matches_pytorch_fid() {
    assert_rel("full-rank covariances", fid::fid(&stats("a"), &stats("b")).unwrap(), expected("fid_ab"), 1e-10);
    // n <= d: singular covariances; scipy's sqrtm and our eigenvalues round differently.
    assert_rel("singular covariances", fid::fid(&stats("c"), &stats("d")).unwrap(), expected("fid_cd"), 1e-6);
    let same = fid::fid(&stats("a"), &stats("a")).unwrap();
    assert!(same.abs() < 1e-9, "FID of a set with itself: {same}");
}

#[test]
fn kid_matches_torch_fidelity_when_subsets_hold_every_image() {
    for (a, b, key) in [("a", "b", "kid_ab"), ("c", "d", "kid_cd")] {
        let ((fa, d), (fb, _)) = (features(a), features(b));
        let k = fid::kid(&fa, &fb, d).unwrap();
        assert_rel(key, k.mean, expected(key), 1e-10);
        assert_eq!((k.std, k.subset_size), (0.0, fa.len() / d));
    }
}

#[test]
fn kid_over_random_subsets_is_seeded() {
    let ((fa, d), (fb, _)) = (features("a"), features("b"));
    let fb = &fb[..30 * d];
    let k1 = fid::kid(&fa, fb, d).unwrap();
    let k2 = fid::kid(&fa, fb, d).unwrap();
    assert_eq!(k1, k2, "same features, same subsets");
    assert_eq!((k1.subsets, k1.subset_size), (100, 30));
    assert!(k1.std > 0.0);
    // Subsets of 30 of 40 estimate the same MMD^2 as all 40 (unbiased), within their spread.
    assert!((k1.mean - expected("kid_ab")).abs() < 3.0 * k1.std + 0.02, "{k1:?}");
}

#[test]
fn statistics_match_numpy_and_survive_a_round_trip() {
    let ours = stats("a");
    let numpy = npz::read_stats(&fixture("stats_a.npz")).unwrap();
    assert_eq!((numpy.dim, numpy.n, numpy.features.is_some()), (16, None, false));
    for (x, y) in ours.mu.iter().zip(&numpy.mu).chain(ours.sigma.iter().zip(&numpy.sigma)) {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{x} vs numpy {y}");
    }
    let path = tmp("stats_a_roundtrip.npz");
    npz::write_stats(&path, &ours).unwrap();
    let back = npz::read_stats(&path).unwrap();
    assert_eq!(back, ours, "mu, sigma, n and the features come back exactly");
    assert_eq!(fid::fid(&back, &stats("b")).unwrap(), fid::fid(&ours, &stats("b")).unwrap());
}

#[test]
fn bad_statistics_are_one_line_errors() {
    let err = fid::fid(&stats("a"), &stats("c")).unwrap_err().to_string();
    assert!(err.contains("16-d") && err.contains("24-d"), "{err}");
    let (f, d) = features("a");
    let err = Stats::from_features(f[..d].to_vec(), d).unwrap_err().to_string();
    assert!(err.contains("at least 2 images"), "{err}");
    let not_npz = tmp("not_stats.npz");
    std::fs::write(&not_npz, b"mu sigma").unwrap();
    let err = format!("{:#}", npz::read_stats(&not_npz).unwrap_err());
    assert!(err.contains("not_stats.npz") && !err.contains('\n'), "{err}");
    let err = format!("{:#}", npz::read_stats(&fixture("features.npz")).unwrap_err());
    assert!(err.contains("no 'mu' array"), "{err}");
}

#[test]
fn datasets_enter_at_their_own_size() {
    use sddpm_gpu::fid::inputs::Input;
    // MNIST IDX (the embedded subset's file): 28x28 grayscale, pixels as stored.
    let idx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-train-10k-images-idx3-ubyte.gz");
    let Input::Images(images) = Input::open(&idx).unwrap() else { panic!("a dataset") };
    assert_eq!(images.len(), 10_000);
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(std::fs::File::open(&idx).unwrap()), &mut raw)
        .unwrap();
    assert_eq!(images.get(1).unwrap(), (raw[16 + 784..16 + 2 * 784].to_vec(), [1, 28, 28]));
    // CIFAR-10 binary: 32x32 RGB, channel-major records become HWC pixels.
    let dir = tmp("fid-cifar");
    std::fs::create_dir_all(&dir).unwrap();
    let records: Vec<u8> = (0..2 * 3073).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("data_batch_1.bin"), &records).unwrap();
    let Input::Images(images) = Input::open(&dir).unwrap() else { panic!("a dataset") };
    let (pixels, shape) = images.get(1).unwrap();
    assert_eq!((images.len(), shape), (2, [3, 32, 32]));
    let rec = &records[3073 + 1..];
    assert_eq!((pixels[0], pixels[1], pixels[2], pixels[3]), (rec[0], rec[1024], rec[2048], rec[1]));
}

/// Statistics of dimension `d` with `sigma` (row-major) and zero means.
fn with_sigma(sigma: Vec<f64>) -> Stats {
    let dim = (sigma.len() as f64).sqrt() as usize;
    Stats { dim, n: None, mu: vec![0.0; dim], sigma, features: None }
}

#[test]
fn invalid_statistics_are_errors_not_numbers() {
    let eye = |s: f64| (0..9).map(|i| if i % 4 == 0 { s } else { 0.0 }).collect::<Vec<f64>>();
    let good = with_sigma(eye(1.0));
    let mut nan_off = eye(1.0);
    nan_off[1] = f64::NAN;
    nan_off[3] = f64::NAN;
    // Indefinite: symmetric with a positive diagonal but eigenvalues 3 and -1.
    let indefinite = vec![1.0, 2.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let asymmetric = vec![2.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 2.0];
    for (what, sigma, needle) in [
        ("NaN off the diagonal", nan_off, "NaN"),
        ("indefinite", indefinite, "positive semi-definite"),
        ("-I", eye(-1.0), "negative variance"),
        ("asymmetric", asymmetric, "not symmetric"),
    ] {
        let bad = with_sigma(sigma);
        for (a, b) in [(&bad, &good), (&good, &bad)] {
            let e = fid::fid(a, b).map(|v| format!("FID {v}")).unwrap_err().to_string();
            assert!(e.contains(needle), "{what}: {e}");
        }
    }
    assert!(fid::fid(&good, &good).unwrap().abs() < 1e-12);
    // KID of features holding NaN is no number either.
    let (mut fa, d) = features("a");
    let (fb, _) = features("b");
    fa[3] = f32::NAN;
    assert!(fid::kid(&fa, &fb, d).is_err());
}

#[test]
fn statistics_files_are_validated_when_read() {
    let good = stats("a");
    let path = tmp("valid.npz");
    let write = |s: &Stats| npz::write_stats(&path, s).unwrap();
    let read_err = || format!("{:#}", npz::read_stats(&path).unwrap_err());
    let mut nan = good.clone();
    nan.sigma[1] = f64::NAN;
    write(&nan);
    assert!(read_err().contains("valid.npz") && read_err().contains("NaN"), "{}", read_err());
    let mut asym = good.clone();
    asym.sigma[1] += 1.0;
    write(&asym);
    assert!(read_err().contains("not symmetric"), "{}", read_err());
    // n = 1e300 (what a float64 'n' can hold) is not a count of images; rewritten through the
    // zip crate so the CRC stays right.
    write(&good);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut src = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    for i in 0..src.len() {
        let mut f = src.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).unwrap();
        if name == "n.npy" {
            let len = data.len();
            data[len - 8..].copy_from_slice(&1e300f64.to_le_bytes());
        }
        zip.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut zip, &data).unwrap();
    }
    std::fs::write(&path, zip.finish().unwrap().into_inner()).unwrap();
    assert!(read_err().contains("'n'"), "{}", read_err());
}

#[test]
fn sixteen_bit_pngs_convert_as_pil_does() {
    // pytorch-fid opens images with PIL and .convert("RGB"): 16-bit grayscale (mode I;16) is
    // clipped to 255, 16-bit color keeps the high byte.
    let gray = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![100u16, 255, 40000]).unwrap();
    let (px, c) = sddpm_gpu::images::pil_pixels(image::DynamicImage::ImageLuma16(gray));
    assert_eq!((px, c), (vec![100, 255, 255], 1));
    let rgb = image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x1234u16, 0xff00, 0x00ff]).unwrap();
    let (px, c) = sddpm_gpu::images::pil_pixels(image::DynamicImage::ImageRgb16(rgb));
    assert_eq!((px, c), (vec![0x12, 0xff, 0x00], 3));
}
