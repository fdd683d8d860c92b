//! A small `torch.save` writer for tests, so the `.pt` readers are tested on files shaped like
//! the ones torch 2.x writes, without Python: a zip archive (`archive/data.pkl`, one entry per
//! storage under `archive/data/`, `version`, `byteorder`, stored uncompressed) whose pickle
//! (protocol 2) holds dicts, module state_dicts (an OrderedDict whose `_metadata` attribute of
//! module versions comes after the items, set by BUILD), ints and tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` from persistent storage ids.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::Path;

/// What a test puts in a checkpoint.
pub enum Obj {
    Int(i64),
    Float(f64),
    /// A float32 tensor: shape, values.
    Tensor(Vec<usize>, Vec<f32>),
    /// An int64 tensor (BatchNorm's num_batches_tracked).
    Long(Vec<usize>, Vec<i64>),
    /// A plain dict (the checkpoint itself).
    Dict(Vec<(String, Obj)>),
    /// `module.state_dict()`: an OrderedDict with `_metadata`.
    StateDict(Vec<(String, Obj)>),
}

/// The pickle of `top` and the storages it refers to, in order.
struct Pickler {
    out: Vec<u8>,
    storages: Vec<Vec<u8>>,
}

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        match i32::try_from(v) {
            Ok(v) => {
                self.out.push(b'J');
                self.out.extend_from_slice(&v.to_le_bytes());
            }
            Err(_) => {
                self.out.extend_from_slice(&[0x8a, 8]);
                self.out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    fn tuple_of_ints(&mut self, v: &[usize]) {
        self.out.push(b'(');
        for &x in v {
            self.int(x as i64);
        }
        self.out.push(b't');
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R");
    }
    fn tensor(&mut self, shape: &[usize], storage: &str, bytes: Vec<u8>, numel: usize) {
        let key = self.storages.len().to_string();
        self.storages.push(bytes);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // The persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel).
        self.out.push(b'(');
        self.str("storage");
        self.global("torch", storage);
        self.str(&key);
        self.str("cpu");
        self.int(numel as i64);
        self.out.extend_from_slice(b"tQ");
        self.int(0);
        self.tuple_of_ints(shape);
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        self.tuple_of_ints(&stride);
        self.out.push(0x89); // requires_grad = False
        self.ordered_dict(); // backward hooks
        self.out.extend_from_slice(b"tR");
    }
    fn items(&mut self, items: &[(String, Obj)]) {
        self.out.push(b'(');
        for (k, v) in items {
            self.str(k);
            self.obj(v);
        }
        self.out.push(b'u');
    }
    fn obj(&mut self, v: &Obj) {
        match v {
            Obj::Int(i) => self.int(*i),
            Obj::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Obj::Tensor(shape, data) => {
                self.tensor(shape, "FloatStorage", bytemuck::cast_slice(data).to_vec(), data.len())
            }
            Obj::Long(shape, data) => {
                self.tensor(shape, "LongStorage", bytemuck::cast_slice(data).to_vec(), data.len())
            }
            Obj::Dict(items) => {
                self.out.push(b'}');
                self.items(items);
            }
            Obj::StateDict(items) => {
                self.ordered_dict();
                self.items(items);
                // state = {'_metadata': OrderedDict({'': {'version': 1}})}, then BUILD.
                self.out.extend_from_slice(b"}(");
                self.str("_metadata");
                self.ordered_dict();
                self.out.push(b'(');
                self.str("");
                self.out.extend_from_slice(b"}(");
                self.str("version");
                self.int(1);
                self.out.extend_from_slice(b"uuub");
            }
        }
    }
}

/// Write `top` as torch.save would, to `path`.
pub fn save(path: &Path, top: &Obj) {
    let mut p = Pickler { out: vec![0x80, 2], storages: Vec::new() };
    p.obj(top);
    p.out.push(b'.');
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&p.out).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (i, bytes) in p.storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// The tensors of a safetensors checkpoint as a module state_dict, names prefixed by `prefix`
/// (DataParallel's `module.`), float values changed by `f` (to tell two copies apart).
pub fn state_dict(ckpt: &sddpm_gpu::checkpoint::TensorFile, prefix: &str, f: impl Fn(f32) -> f32) -> Obj {
    let mut items: Vec<(String, Obj)> = ckpt
        .tensors
        .iter()
        .map(|(n, t)| (format!("{prefix}{n}"), Obj::Tensor(t.shape.clone(), t.data.iter().map(|&v| f(v)).collect())))
        .collect();
    items.extend(ckpt.ints.iter().map(|(n, t)| (format!("{prefix}{n}"), Obj::Long(t.shape.clone(), t.data.clone()))));
    Obj::StateDict(items)
}
