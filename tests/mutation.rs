//! Untrusted files never crash or exhaust the tool: every loader (safetensors checkpoints, MNIST
//! IDX (raw and gzipped), CIFAR-10 binary, PNG and JPEG images, pytorch-fid .npz statistics, torch zip + pickle weights) is
//! fed truncated files, flipped bytes, absurd declared sizes and crafted files (deep nesting,
//! quadratic copies, many views of one storage, huge declared dimensions). Each must return (an
//! error or, rarely, a value) without panicking, and the memory it holds at its peak (live bytes,
//! counted by a global allocator) may not exceed a small multiple of the file's size: 8x for the
//! binary formats (f16 -> f32 doubles), 6144x for images (compressed pixels legitimately expand
//! 2048x, and a decoder holds its planes beside the output) plus 1 MiB slack; crafted files get
//! stated bounds. The allocator also refuses to hold more than 1 GiB at all ([`CAP`]), so a
//! loader that tries aborts this test binary instead of the machine running out of memory.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fixture, rng, tmp};
use rand::Rng;

struct Counting;

/// Bytes allocated and not yet freed, and the most of them since the last reset.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The most this test binary may hold at once.
const CAP: usize = 1 << 30;

fn grow(by: usize) -> bool {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    if live > CAP {
        LIVE.fetch_sub(by, Ordering::Relaxed);
        return false;
    }
    PEAK.fetch_max(live, Ordering::Relaxed);
    true
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !grow(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !grow(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            LIVE.fetch_sub(new_size.saturating_sub(layout.size()), Ordering::Relaxed);
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` and return its result and the most memory it held at once beyond what was live before.
fn measure<T>(f: impl FnOnce() -> T) -> (std::thread::Result<T>, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

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
        let (ok, peak) = measure(|| load(path));
        let Ok(ok) = ok else { panic!("{what}, {how}: the loader panicked") };
        errors += !ok as usize;
        let limit = factor * m.len().max(bytes.len()) + (1 << 20);
        assert!(peak <= limit, "{what}, {how}: held {peak} bytes at once for a {}-byte file", m.len());
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
    check("JPEG", &good, &dir.join("001.jpg"), 6144, vec![], &|_| {
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
    check("PNG", &fixture("fid/images/rgb/001.png"), &dir.join("001.png"), 6144, vec![], &|_| {
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

// ---- crafted files (issue 19 items 1, 2, 5, 6, 8) ----------------------------------------------

/// A torch zip archive (`archive/data.pkl` deflated, plus `extra` entries) around `pickle`.
fn torch_zip(pickle: &[u8], extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let deflate =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).large_file(true);
    zip.start_file("archive/data.pkl", deflate).unwrap();
    zip.write_all(pickle).unwrap();
    for (name, bytes) in extra {
        zip.start_file(*name, deflate).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Load `bytes` as a torch file under the cap; it must fail with one line mentioning `needle`
/// and hold at most `limit` bytes.
fn refused_torch(what: &str, bytes: &[u8], needle: &str, limit: usize) {
    let path = tmp(&format!("crafted-{}.pt", what.replace(' ', "-")));
    std::fs::write(&path, bytes).unwrap();
    let (r, peak) = measure(|| sddpm_gpu::fid::torchzip::load(&path).map(|_| ()).map_err(|e| format!("{e:#}")));
    let r = r.unwrap_or_else(|_| panic!("{what}: the loader panicked"));
    let e = r.expect_err(what);
    assert!(e.contains(needle) && !e.contains('\n') && e.contains("crafted-"), "{what}: {e}");
    assert!(peak <= limit, "{what}: held {peak} bytes at once for a {}-byte file", bytes.len());
}

#[test]
fn deeply_nested_pickles_are_refused_without_overflowing_the_stack() {
    let _one = serial();
    let depth = 1_000_000;
    // ((((...)))) built with TUPLE1, [[[...]]] with APPEND, {0: {0: ...}} with SETITEM.
    let mut tuples = vec![0x80, 2, b')'];
    tuples.extend(std::iter::repeat_n(0x85u8, depth));
    tuples.push(b'.');
    let mut lists = vec![0x80, 2];
    lists.extend(std::iter::repeat_n(b']', depth));
    lists.extend(std::iter::repeat_n(b'a', depth - 1));
    lists.push(b'.');
    let mut dicts = vec![0x80, 2];
    for _ in 0..depth {
        dicts.extend_from_slice(b"}K\x00");
    }
    dicts.push(b'}');
    dicts.extend(std::iter::repeat_n(b's', depth));
    dicts.push(b'.');
    for (what, pkl) in [("nested tuples", tuples), ("nested lists", lists), ("nested dicts", dicts)] {
        let zip = torch_zip(&pkl, &[]);
        assert!(zip.len() < 20_000, "{what}: {} bytes", zip.len());
        // A million stack entries are ~100 MB; bounded, where a naive reader overflows the stack.
        refused_torch(what, &zip, "deep", 192 << 20);
    }
}

#[test]
fn memoised_appends_cannot_copy_memory_quadratically() {
    let _one = serial();
    // An empty list, then 200,000 times: MEMOIZE it, APPEND an int. Each APPEND changes a list
    // the memo shares, so a naive reader copies it every time (200,000^2 / 2 values kept).
    let mut pkl = vec![0x80, 4, b']'];
    for _ in 0..200_000 {
        pkl.extend_from_slice(&[0x94, b'K', 0, b'a']);
    }
    pkl.push(b'.');
    let zip = torch_zip(&pkl, &[]);
    assert!(zip.len() < 4096, "{} bytes", zip.len());
    refused_torch("memoised appends", &zip, "copies", 64 << 20);
}

/// A pickle of a dict of `views` tensors, each all of one FloatStorage of `numel` elements.
fn views_pickle(views: usize, numel: u32) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    for i in 0..views {
        let name = format!("t{i}");
        p.push(b'X');
        p.extend_from_slice(&(name.len() as u32).to_le_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        if i == 0 {
            p.extend_from_slice(
                b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ",
            );
            p.extend_from_slice(&numel.to_le_bytes());
            p.extend_from_slice(b"tQq\x00");
        } else {
            p.extend_from_slice(b"h\x00");
        }
        p.push(b'K');
        p.push(0);
        p.push(b'J');
        p.extend_from_slice(&numel.to_le_bytes());
        p.extend_from_slice(&[0x85, b'K', 1, 0x85, b't', b'R']);
    }
    p.extend_from_slice(b"u.");
    p
}

#[test]
fn many_views_of_one_storage_are_refused() {
    let _one = serial();
    // 2000 views of one 16 MB storage: a 30 KB file that would copy out 32 GB.
    let numel = 4 << 20;
    let zip = torch_zip(&views_pickle(2000, numel), &[("archive/data/0", vec![0u8; numel as usize * 4])]);
    assert!(zip.len() < 100_000, "{} bytes", zip.len());
    // The storage itself (16 MB raw, 16 MB as f32) and a view or two are fine; 2000 are not.
    refused_torch("many views", &zip, "view", 160 << 20);
    // Two views (tied weights) of the same storage still load.
    let path = tmp("two-views.pt");
    std::fs::write(&path, torch_zip(&views_pickle(2, 1024), &[("archive/data/0", vec![0u8; 4096])])).unwrap();
    let f = sddpm_gpu::fid::torchzip::load(&path).unwrap();
    assert_eq!(f.tensors.len(), 2);
}

/// Writes an array's data.
type Body<'a> = &'a dyn Fn(&mut dyn std::io::Write);

/// A stored (uncompressed, like np.savez) or deflated `.npz` of `arrays` (name, shape, f64s).
fn npz(arrays: &[(&str, Vec<usize>, Body)], deflate: bool) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method).large_file(true);
    for (name, shape, body) in arrays {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let mut h = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        zip.start_file(format!("{name}.npy"), opts).unwrap();
        zip.write_all(b"\x93NUMPY\x01\x00").unwrap();
        zip.write_all(&(h.len() as u16).to_le_bytes()).unwrap();
        zip.write_all(h.as_bytes()).unwrap();
        body(&mut zip);
    }
    zip.finish().unwrap().into_inner()
}

fn zeros(n: usize) -> impl Fn(&mut dyn std::io::Write) {
    move |w: &mut dyn std::io::Write| {
        let chunk = vec![0u8; 1 << 16];
        let mut left = n * 8;
        while left > 0 {
            let k = left.min(chunk.len());
            w.write_all(&chunk[..k]).unwrap();
            left -= k;
        }
    }
}

#[test]
fn npz_dimensions_are_bounded_before_the_data_is_read() {
    let _one = serial();
    // 4096-d statistics, deflated: 128 MB of sigma in a small file. Refused from mu's header.
    let d = 4096;
    let bytes = npz(&[("mu", vec![d], &zeros(d)), ("sigma", vec![d, d], &zeros(d * d))], true);
    let path = tmp("crafted-4096d.npz");
    std::fs::write(&path, &bytes).unwrap();
    let (r, peak) = measure(|| sddpm_gpu::fid::npz::read_stats(&path).map(|_| ()).map_err(|e| format!("{e:#}")));
    let e = r.unwrap().expect_err("4096-d statistics");
    assert!(e.contains("2048") && e.contains("crafted-4096d.npz") && !e.contains('\n'), "{e}");
    assert!(peak <= 8 * bytes.len() + (1 << 20), "held {peak} bytes for a {}-byte file", bytes.len());
}

#[test]
fn zip_entries_are_checked_against_their_crc() {
    let _one = serial();
    let stats = sddpm_gpu::fid::Stats {
        dim: 4,
        n: Some(10),
        mu: vec![0.0; 4],
        sigma: (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect(),
        features: None,
    };
    let path = tmp("crc.npz");
    sddpm_gpu::fid::npz::write_stats(&path, &stats).unwrap();
    assert_eq!(sddpm_gpu::fid::npz::read_stats(&path).unwrap(), stats);
    // Flip one bit of mu's first value (stored entries: the bytes are in the file as written).
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"\x93NUMPY").unwrap();
    let data = at + 10 + u16::from_le_bytes([bytes[at + 8], bytes[at + 9]]) as usize;
    bytes[data + 7] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let e = format!("{:#}", sddpm_gpu::fid::npz::read_stats(&path).unwrap_err());
    assert!(e.contains("CRC-32") && e.contains("crc.npz"), "{e}");
}

#[test]
fn idx_headers_with_empty_images_are_refused() {
    let _one = serial();
    for (n, what) in [(4_000_000_000u32, "4e9 images of 0x0"), (5, "5 images of 0x0")] {
        let path = tmp(&format!("crafted-{n}-images-idx3-ubyte"));
        std::fs::write(&path, idx_bytes(n, 0, 0, 0)).unwrap();
        let gz = tmp(&format!("crafted-{n}-images-idx3-ubyte.gz"));
        std::fs::write(&gz, gzip(&idx_bytes(n, 0, 0, 0))).unwrap();
        for p in [&path, &gz] {
            let (r, peak) = measure(|| sddpm_gpu::data::load(Some(p), 28).map(|_| ()).map_err(|e| format!("{e:#}")));
            let e = r.unwrap().expect_err(what);
            assert!(e.contains("0x0") && e.contains("crafted-") && !e.contains('\n'), "{what}: {e}");
            assert!(peak <= 1 << 20, "{what}: held {peak} bytes");
        }
    }
    // Tiny images blown up to the training size: refused, not allocated.
    let path = tmp("crafted-tiny-images-idx3-ubyte");
    std::fs::write(&path, idx_bytes(1 << 20, 1, 1, 1 << 20)).unwrap();
    let (r, peak) = measure(|| sddpm_gpu::data::load(Some(&path), 4096).map(|_| ()).map_err(|e| format!("{e:#}")));
    let e = r.unwrap().expect_err("1x1 images at 4096 px");
    assert!(e.contains("too small"), "{e}");
    assert!(peak <= 8 << 20, "held {peak} bytes");
}

#[test]
fn npy_headers_are_not_echoed_whole() {
    let _one = serial();
    let huge = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({}), }}", "7, ".repeat(20_000));
    let path = tmp("crafted-header.npz");
    std::fs::write(&path, npz_with_header(&huge)).unwrap();
    let e = format!("{:#}", sddpm_gpu::fid::npz::read_stats(&path).unwrap_err());
    assert!(e.len() < 400 && e.contains("crafted-header.npz"), "{} bytes: {}", e.len(), &e[..e.len().min(400)]);
}
