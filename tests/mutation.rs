//! Untrusted files never crash or exhaust the tool: every loader (safetensors checkpoints, MNIST
//! IDX (raw and gzipped), CIFAR-10 binary, PNG and JPEG images, pytorch-fid .npz statistics, torch zip + pickle weights) is
//! fed truncated files, flipped bytes and absurd declared sizes. Each must return (an error or,
//! rarely, a value) without panicking, and no single allocation may exceed a small multiple of
//! the file's size (a counting global allocator watches): 8x for the binary formats (f16 -> f32
//! doubles), 2048x for images (compressed pixels legitimately expand) plus 1 MiB slack.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fixture, rng, tmp};
use rand::Rng;

struct Counting;

static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        PEAK.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The mutants of `bytes`: truncations, single-byte flips, and a few `extra` hand-made ones.
fn mutants(bytes: &[u8], seed: u64, extra: Vec<Vec<u8>>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for cut in [0, 1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len().saturating_sub(1)] {
        out.push((format!("truncated to {cut}"), bytes[..cut.min(bytes.len())].to_vec()));
    }
    let mut r = rng(seed);
    for _ in 0..60 {
        let mut b = bytes.to_vec();
        // Headers hold the sizes: flip there more often.
        let at = if r.random_bool(0.5) { r.random_range(0..b.len().min(256)) } else { r.random_range(0..b.len()) };
        b[at] ^= 1 << r.random_range(0..8);
        if r.random_bool(0.3) {
            b[at] = 0xff;
        }
        out.push((format!("byte {at} changed"), b));
    }
    out.extend(extra.into_iter().enumerate().map(|(i, b)| (format!("absurd size #{i}"), b)));
    out
}

/// One test at a time: the peak is process-wide and tests run on parallel threads, so a test
/// building a large mutant (the gzip bomb) must not run while another measures. Every test holds
/// this for its whole body.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `load` on every mutant of `original` written to `path`; check no panic and the peak allocation.
fn check(what: &str, original: &Path, path: &Path, factor: usize, extra: Vec<Vec<u8>>, load: &dyn Fn(&Path) -> bool) {
    let bytes = std::fs::read(original).unwrap();
    let mut errors = 0;
    for (how, m) in mutants(&bytes, bytes.len() as u64, extra) {
        std::fs::write(path, &m).unwrap();
        PEAK.store(0, Ordering::Relaxed);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(path)));
        let peak = PEAK.load(Ordering::Relaxed);
        let Ok(ok) = ok else { panic!("{what}, {how}: the loader panicked") };
        errors += !ok as usize;
        let limit = factor * m.len().max(bytes.len()) + (1 << 20);
        assert!(peak <= limit, "{what}, {how}: allocated {peak} bytes at once for a {}-byte file", m.len());
    }
    assert!(errors > 0, "{what}: no mutant was rejected; the check cannot fail");
}

/// A one-line error, when there is one.
fn one_line<T>(r: anyhow::Result<T>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            false
        }
    }
}

#[test]
fn safetensors_checkpoints() {
    let _one = serial();
    let mut absurd = std::fs::read(fixture("weights.safetensors")).unwrap();
    absurd[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    check("safetensors", &fixture("weights.safetensors"), &tmp("m.safetensors"), 8, vec![absurd], &|p| {
        one_line(sddpm_gpu::checkpoint::TensorFile::load(p))
    });
}

fn idx_bytes(n: u32, h: u32, w: u32, body: usize) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0x803u32, n, h, w] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend((0..body).map(|i| (i * 7 % 251) as u8));
    b
}

#[test]
fn idx_images() {
    let _one = serial();
    let good = tmp("m-good-idx3-ubyte");
    std::fs::write(&good, idx_bytes(3, 28, 28, 3 * 784)).unwrap();
    // Declared sizes far beyond the file, and a product that wraps around 2^64.
    let absurd = vec![idx_bytes(u32::MAX, 28, 28, 3 * 784), idx_bytes(0x8000_0000, 0x8000_0000, 4, 16)];
    check("IDX", &good, &tmp("m-train-images-idx3-ubyte"), 8, absurd, &|p| {
        one_line(sddpm_gpu::data::load(Some(p), 28))
    });
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn gzipped_idx_images() {
    let _one = serial();
    let good = tmp("m-good-idx3-ubyte.gz");
    std::fs::write(&good, gzip(&idx_bytes(3, 28, 28, 3 * 784))).unwrap();
    // A gzip bomb (50 MB of pixels behind a header that declares 3 images) and a header that
    // declares more than the compressed file could ever expand to: both stop before allocating.
    let bombs = vec![gzip(&idx_bytes(3, 28, 28, 50 << 20)), gzip(&idx_bytes(1 << 30, 28, 28, 3 * 784))];
    check("gzipped IDX", &good, &tmp("m-gz-train-images-idx3-ubyte.gz"), 8, bombs, &|p| {
        one_line(sddpm_gpu::data::load(Some(p), 28))
    });
}

#[test]
fn jpeg_images() {
    let _one = serial();
    let dir = tmp("m-jpeg");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("fid/images/rgb/000.png"), dir.join("000.png")).unwrap();
    let good = tmp("m-good.jpg");
    image::open(fixture("fid/images/rgb/001.png")).unwrap().to_rgb8().save(&good).unwrap();
    check("JPEG", &good, &dir.join("001.jpg"), 2048, vec![], &|_| {
        let Ok(sddpm_gpu::fid::inputs::Input::Images(images)) = sddpm_gpu::fid::inputs::Input::open(&dir) else {
            panic!("two files make an image folder")
        };
        one_line(images.get(1))
    });
}

#[test]
fn cifar10_binary() {
    let _one = serial();
    let dir = tmp("m-cifar");
    std::fs::create_dir_all(&dir).unwrap();
    let good = tmp("m-cifar-good.bin");
    std::fs::write(&good, (0..2 * 3073).map(|i| (i % 256) as u8).collect::<Vec<u8>>()).unwrap();
    check("CIFAR-10", &good, &dir.join("data_batch_1.bin"), 8, vec![], &|_| {
        one_line(sddpm_gpu::data::load(Some(&dir), 32))
    });
}

#[test]
fn png_images() {
    let _one = serial();
    let dir = tmp("m-images");
    std::fs::create_dir_all(&dir).unwrap();
    let other = dir.join("000.png");
    std::fs::copy(fixture("fid/images/rgb/000.png"), &other).unwrap();
    check("PNG", &fixture("fid/images/rgb/001.png"), &dir.join("001.png"), 2048, vec![], &|_| {
        let Ok(sddpm_gpu::fid::inputs::Input::Images(images)) = sddpm_gpu::fid::inputs::Input::open(&dir) else {
            panic!("two files make an image folder")
        };
        one_line(images.get(1))
    });
}

/// A valid zip holding `mu.npy` with this npy header and 16 doubles of data.
fn npz_with_header(header: &str) -> Vec<u8> {
    use std::io::Write;
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
    npy.extend_from_slice(h.as_bytes());
    npy.extend(std::iter::repeat_n(0u8, 16 * 8));
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("mu.npy", zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(&npy).unwrap();
    zip.finish().unwrap().into_inner()
}

#[test]
fn npz_statistics() {
    let _one = serial();
    let absurd = vec![
        npz_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }"),
        npz_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }"),
        npz_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (16,), }"),
    ];
    let original = fixture("fid/stats_a.npz");
    check("npz", &original, &tmp("m.npz"), 8, absurd, &|p| one_line(sddpm_gpu::fid::npz::read_stats(p)));
}

#[test]
fn torch_zip_and_pickle() {
    let _one = serial();
    for name in ["tiny_script.pt", "tiny_state.pth"] {
        let original: PathBuf = fixture(&format!("fid/{name}"));
        check(name, &original, &tmp(&format!("m-{name}")), 8, vec![], &|p| one_line(sddpm_gpu::fid::torchzip::load(p)));
    }
}

#[test]
fn official_pytorch_checkpoints() {
    let _one = serial();
    // An SDDPM training checkpoint as torch.save writes it (tests/common/torch.rs), read as every
    // `--checkpoint` reads a .pt: zip, pickle, state_dict choice, config inferred from shapes.
    let ckpt = sddpm_gpu::checkpoint::TensorFile::load(&fixture("weights.safetensors")).unwrap();
    let original = tmp("sddpm.pt");
    let top = common::torch::Obj::Dict(vec![("net_model".into(), common::torch::state_dict(&ckpt, "module.", |v| v))]);
    common::torch::save(&original, &top);
    check("sddpm .pt", &original, &tmp("m.pt"), 8, vec![], &|p| one_line(sddpm_gpu::weights::open(p, None, None)));
}
