//! The spiking U-Net (the reference's Spk_UNet) built on the command graph.
//!
//! Activations are [T*B, C, H, W], time-major as the reference's flattened [T, B, ...]. Every
//! node is labelled with its official module path (`downblocks.3.conv1`), so profiles and error
//! messages speak the names of the state_dict.

use std::collections::BTreeMap;

use super::arch::arch;
use super::params::{Entry, Params};
use super::skeleton::{walk, Block, BlockBuilder};
use super::ModelConfig;
use crate::graph::{Graph, TensorId};
use crate::ops::batchnorm::{self, BnGroups, BnParams};
use crate::ops::neuron::Neuron;
use crate::ops::{conv, elementwise, embedding, layout, matmul, neuron, readout, spike_attention};

/// The graph tensors of a built U-Net.
pub struct UNet {
    /// Every state_dict tensor the graph uses, by official name (num_batches_tracked excluded:
    /// it is host-side bookkeeping).
    pub params: BTreeMap<String, TensorId>,
    /// eps_hat [B, C, H, W].
    pub eps: TensorId,
    /// Every spiking layer's output [T*B, C, H, W], by official module name (`downblocks.0.neuron1`).
    pub spikes: Vec<(String, TensorId)>,
    /// Inference only: conv + BatchNorm pairs folded into one conv, computed at upload.
    pub folds: Vec<Fold>,
    /// Training with dropout: the [4] u32 input keying the masks, written by the trainer each
    /// step (see [`crate::ops::dropout::key_words`]).
    pub dropout_key: Option<TensorId>,
}

/// A conv whose following BatchNorm (running statistics) is folded into its weight and bias:
/// alpha = gamma / sqrt(var + eps), W' = W * alpha, b' = b * alpha + (beta - mean * alpha).
#[derive(Debug, Clone)]
pub struct Fold {
    pub conv: String,
    pub bn: String,
    pub weight: TensorId,
    pub bias: TensorId,
}

impl Fold {
    /// The folded (weight, bias) from the checkpoint's conv and BN tensors.
    pub fn compute(&self, ckpt: &crate::checkpoint::Checkpoint) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let get = |n: String| ckpt.get(&n).map(|t| t.data.clone());
        let (w, b) = (get(format!("{}.weight", self.conv))?, get(format!("{}.bias", self.conv))?);
        let (gamma, beta) = (get(format!("{}.weight", self.bn))?, get(format!("{}.bias", self.bn))?);
        let (mean, var) = (get(format!("{}.running_mean", self.bn))?, get(format!("{}.running_var", self.bn))?);
        let per = w.len() / b.len();
        let alpha: Vec<f32> = gamma.iter().zip(&var).map(|(g, v)| g / (v + batchnorm::EPS).sqrt()).collect();
        let w = w.iter().enumerate().map(|(i, v)| v * alpha[i / per]).collect();
        let b = (0..b.len()).map(|c| b[c] * alpha[c] + (beta[c] - mean[c] * alpha[c])).collect();
        Ok((w, b))
    }
}

impl UNet {
    /// Upload every parameter and running statistic from `ckpt` into a compiled `plan`.
    pub fn upload(
        &self,
        ctx: &crate::gpu::Context,
        plan: &crate::graph::Plan,
        ckpt: &crate::checkpoint::Checkpoint,
    ) -> anyhow::Result<()> {
        for (name, &id) in &self.params {
            plan.write(ctx, id, &ckpt.get(name)?.data)?;
        }
        for f in &self.folds {
            let (w, b) = f.compute(ckpt)?;
            plan.write(ctx, f.weight, &w)?;
            plan.write(ctx, f.bias, &b)?;
        }
        Ok(())
    }
}

struct Builder<'a> {
    g: &'a mut Graph,
    cfg: &'a ModelConfig,
    params: Params,
    folds: Vec<Fold>,
    t: usize,
    neuron: Neuron,
    /// Training form: BatchNorm with batch statistics, neurons saving what backward needs.
    train: bool,
    /// How training BatchNorm cuts the batch.
    bn_groups: BnGroups,
    spikes: Vec<(String, TensorId)>,
}

impl Builder<'_> {
    fn p(&mut self, name: &str) -> TensorId {
        self.params.get(self.g, name)
    }

    fn recording(&self) -> bool {
        self.params.is_recording()
    }

    fn bn(&mut self, name: &str) -> BnParams {
        BnParams {
            weight: self.p(&format!("{name}.weight")),
            bias: self.p(&format!("{name}.bias")),
            running_mean: self.p(&format!("{name}.running_mean")),
            running_var: self.p(&format!("{name}.running_var")),
            groups: self.bn_groups,
        }
    }

    /// conv (3x3 pad 1 or 1x1 pad 0) with bias, then BatchNorm: at inference one conv with the
    /// BN folded in (equal to float rounding), in training the two ops.
    fn conv_bn(&mut self, x: TensorId, conv_name: &str, bn_name: &str, stride: usize) -> TensorId {
        let (w, b) = self.conv_params(conv_name, bn_name);
        let k = self.g.shape(w)[2];
        let h = conv::conv2d(self.g, x, w, Some(b), stride, k / 2, conv_name);
        if self.train {
            self.batchnorm(h, bn_name)
        } else {
            h
        }
    }

    /// (weight, bias) of a conv followed by BN: the official tensors when training, the folded
    /// pair at inference.
    fn conv_params(&mut self, conv_name: &str, bn_name: &str) -> (TensorId, TensorId) {
        if self.train {
            return (self.p(&format!("{conv_name}.weight")), self.p(&format!("{conv_name}.bias")));
        }
        let ws = self.params.shape(&format!("{conv_name}.weight")).to_vec();
        let bs = self.params.shape(&format!("{conv_name}.bias")).to_vec();
        let weight = self.g.param(&format!("{conv_name}.weight (+{bn_name})"), &ws);
        let bias = self.g.param(&format!("{conv_name}.bias (+{bn_name})"), &bs);
        self.folds.push(Fold { conv: conv_name.into(), bn: bn_name.into(), weight, bias });
        (weight, bias)
    }

    fn batchnorm(&mut self, x: TensorId, name: &str) -> TensorId {
        let bn = self.bn(name);
        if self.train {
            batchnorm::batchnorm_train(self.g, x, bn, name).0
        } else {
            batchnorm::batchnorm_eval(self.g, x, bn, name)
        }
    }

    fn spikes(&mut self, x: TensorId, name: &str) -> TensorId {
        let s = if self.train {
            neuron::neuron_forward_train(self.g, x, self.t, self.neuron, name).0
        } else {
            neuron::neuron_forward(self.g, x, self.t, self.neuron, name)
        };
        self.spikes.push((name.to_string(), s));
        s
    }

    /// Training: BatchNorm of `c` (plus the [B, C] term `emb`) straight into a neuron: BN's
    /// statistics pass, then one kernel that applies BN, adds the term and fires, so neither sum
    /// is stored. Only for a BN output that feeds nothing but this neuron.
    fn bn_spikes(&mut self, c: TensorId, bn_name: &str, emb: Option<TensorId>, name: &str) -> TensorId {
        let bn = self.bn(bn_name);
        let saved = batchnorm::batchnorm_stats(self.g, c, bn, bn_name);
        let input = neuron::BnInput { c, bn, saved, emb, bn_name: bn_name.to_string() };
        let s = neuron::neuron_forward_train_bn(self.g, input, self.t, self.neuron, name);
        self.spikes.push((name.to_string(), s));
        s
    }

    /// The spikes of [`Self::conv_bn`] (stride 1), with BN fused into the neuron in training.
    fn conv_bn_spikes(&mut self, x: TensorId, conv_name: &str, bn_name: &str, name: &str) -> TensorId {
        if !self.train {
            let h = self.conv_bn(x, conv_name, bn_name, 1);
            return self.spikes(h, name);
        }
        let (w, b) = self.conv_params(conv_name, bn_name);
        let k = self.g.shape(w)[2];
        let c = conv::conv2d(self.g, x, w, Some(b), 1, k / 2, conv_name);
        self.bn_spikes(c, bn_name, None, name)
    }

    /// conv (stride 1) + BN + the residual `r`: in training BN's apply kernel adds r; at
    /// inference BN is folded into the conv, whose epilogue adds it.
    fn conv_bn_add(&mut self, x: TensorId, conv_name: &str, bn_name: &str, r: TensorId) -> TensorId {
        let (w, b) = self.conv_params(conv_name, bn_name);
        let k = self.g.shape(w)[2];
        if self.train {
            let c = conv::conv2d(self.g, x, w, Some(b), 1, k / 2, conv_name);
            let bn = self.bn(bn_name);
            batchnorm::batchnorm_train_add(self.g, c, bn, r, bn_name)
        } else {
            let epilogue = conv::Epilogue { emb: None, residual: Some(r) };
            conv::conv2d_fused(self.g, x, w, Some(b), 1, k / 2, epilogue, conv_name)
        }
    }

    /// temb_proj's Linear of the block `name` (its Swish is shared: see [`time_mlp`]).
    fn temb_proj(&mut self, name: &str, temb_act: TensorId) -> TensorId {
        let (pw, pb) = (self.p(&format!("{name}.temb_proj.1.weight")), self.p(&format!("{name}.temb_proj.1.bias")));
        matmul::linear(self.g, temb_act, pw, Some(pb), &format!("{name}.temb_proj"))
    }

    /// A ResBlock's shortcut: x itself, or a 1x1 conv where the channel count changes.
    fn shortcut(&mut self, x: TensorId, name: &str, cin: usize, cout: usize) -> TensorId {
        if cin == cout {
            return x;
        }
        let w = self.p(&format!("{name}.shortcut.weight"));
        let b = self.p(&format!("{name}.shortcut.bias"));
        conv::conv2d(self.g, x, w, Some(b), 1, 0, &format!("{name}.shortcut"))
    }

    /// The modules of [`Self::attention`] over `c` channels, in the reference's order.
    fn declare_attention(&mut self, name: &str, c: usize) {
        for part in ["q", "k", "v"] {
            self.params.conv(&format!("{name}.{part}_conv"), c, c, 1);
        }
        for part in ["q", "k", "v"] {
            self.params.batchnorm(&format!("{name}.{part}_bn"), c);
        }
        self.params.conv(&format!("{name}.proj_conv"), c, c, 1);
        self.params.batchnorm(&format!("{name}.proj_bn"), c);
    }

    /// SpikeSelfAttention (sddpm-spec.md section 10.1): s = IF(x); q, k, v = IF(BN(conv1x1(s)));
    /// o = (q k^T) v * scale per head; y = x + BN(conv1x1(IF(o))).
    fn attention(&mut self, x: TensorId, name: &str) -> TensorId {
        let s = self.spikes(x, &format!("{name}.neuron"));
        let [q, k, v] = ["q", "k", "v"].map(|part| {
            let (conv, bn) = (format!("{name}.{part}_conv"), format!("{name}.{part}_bn"));
            self.conv_bn_spikes(s, &conv, &bn, &format!("{name}.{part}_neuron"))
        });
        let o = spike_attention::spike_attention(self.g, q, k, v, self.cfg.heads, name);
        let a = self.spikes(o, &format!("{name}.attn_neuron"));
        let (proj_conv, proj_bn) = (format!("{name}.proj_conv"), format!("{name}.proj_bn"));
        self.conv_bn_add(a, &proj_conv, &proj_bn, x)
    }
}

impl BlockBuilder for Builder<'_> {
    fn time_embedding(&mut self, t: TensorId) -> TensorId {
        time_embedding(self.g, &mut self.params, t, [self.cfg.diffusion_steps, self.cfg.ch, self.cfg.tdim()])
    }

    /// The input is repeated over T; the conv acts per image, so it runs once per image and its
    /// output is repeated: identical numbers, T times less work. At inference BN (running
    /// statistics) is per image too and runs before the repeat; in training it needs the batch
    /// statistics over all T*B copies (they enter the unbiased running variance) and runs after.
    fn stem(&mut self, x: TensorId) -> TensorId {
        let (ch, img_ch) = (self.cfg.ch, self.cfg.img_ch);
        self.params.conv("conv", ch, img_ch, 3);
        self.params.batchnorm("bn", ch);
        self.params.conv("conv_identity", ch, ch, 3);
        self.params.batchnorm("bn_identity", ch);
        if self.recording() {
            return x;
        }
        let s = if self.train {
            let (w, bias) = (self.p("conv.weight"), self.p("conv.bias"));
            let h = conv::conv2d(self.g, x, w, Some(bias), 1, 1, "conv");
            let h = layout::repeat_leading(self.g, h, self.t, "repeat_time");
            self.bn_spikes(h, "bn", None, "neuron")
        } else {
            let h = self.conv_bn(x, "conv", "bn", 1);
            let h = layout::repeat_leading(self.g, h, self.t, "repeat_time");
            self.spikes(h, "neuron")
        };
        self.conv_bn(s, "conv_identity", "bn_identity", 1)
    }

    fn block(&mut self, block: &Block, x: TensorId, temb_act: TensorId) -> TensorId {
        let tdim = self.cfg.tdim();
        match block {
            Block::Res { name, cin, cout, attn } => {
                let (cin, cout) = (*cin, *cout);
                self.params.linear(&format!("{name}.temb_proj.1"), cout, tdim);
                self.params.conv(&format!("{name}.conv1"), cout, cin, 3);
                self.params.batchnorm(&format!("{name}.bn1"), cout);
                self.params.conv(&format!("{name}.conv2"), cout, cout, 3);
                self.params.batchnorm(&format!("{name}.bn2"), cout);
                self.params.shortcut(name, cin, cout);
                if *attn {
                    self.declare_attention(&format!("{name}.attn"), cout);
                }
                if self.recording() {
                    return x;
                }
                let s = self.spikes(x, &format!("{name}.neuron1"));
                let (conv1, bn1) = (format!("{name}.conv1"), format!("{name}.bn1"));
                let (w, b) = self.conv_params(&conv1, &bn1);
                let proj = self.temb_proj(name, temb_act);
                let neuron2 = format!("{name}.neuron2");
                let s = if self.train {
                    let c = conv::conv2d(self.g, s, w, Some(b), 1, 1, &conv1);
                    // bn1's apply and the time-embedding add run inside neuron2's kernels.
                    self.bn_spikes(c, &bn1, Some(proj), &neuron2)
                } else {
                    // bn1 is folded into conv1, whose epilogue adds the time embedding.
                    let epilogue = conv::Epilogue { emb: Some(proj), residual: None };
                    let h = conv::conv2d_fused(self.g, s, w, Some(b), 1, 1, epilogue, &conv1);
                    self.spikes(h, &neuron2)
                };
                // bn2 + the shortcut: one BN-apply kernel in training, conv2's epilogue at inference.
                let shortcut = self.shortcut(x, name, cin, cout);
                let h = self.conv_bn_add(s, &format!("{name}.conv2"), &format!("{name}.bn2"), shortcut);
                if *attn {
                    self.attention(h, &format!("{name}.attn"))
                } else {
                    h
                }
            }
            Block::Down { name, c } | Block::Up { name, c } => {
                self.params.conv(&format!("{name}.conv"), *c, *c, 3);
                self.params.batchnorm(&format!("{name}.bn"), *c);
                if self.recording() {
                    return x;
                }
                let s = self.spikes(x, &format!("{name}.neuron"));
                let (conv, bn) = (format!("{name}.conv"), format!("{name}.bn"));
                if matches!(block, Block::Down { .. }) {
                    self.conv_bn(s, &conv, &bn, 2)
                } else {
                    let s = layout::upsample2x(self.g, s, &format!("{name}.upsample"));
                    self.conv_bn(s, &conv, &bn, 1)
                }
            }
        }
    }

    fn concat(&mut self, h: TensorId, skip: TensorId, name: &str) -> TensorId {
        if self.recording() {
            return h;
        }
        layout::concat_channels(self.g, h, skip, name)
    }

    /// BN -> Swish -> conv (per step), then the (3,3,1) conv3d branch added residually, and the
    /// membrane readout over T.
    fn tail(&mut self, h: TensorId, ch: usize) -> TensorId {
        let img_ch = self.cfg.img_ch;
        self.params.batchnorm("tail_bn", ch);
        self.params.conv("tail_conv", img_ch, ch, 3);
        self.params.weighted("T_output_layer", vec![img_ch, img_ch, 3, 3, 1]);
        self.params.batchnorm("last_bn", img_ch);
        if self.recording() {
            return h;
        }
        let h = if self.train {
            // BN's apply, the Swish and (below) the residual add run as one kernel in training.
            let bn = self.bn("tail_bn");
            batchnorm::batchnorm_train_swish(self.g, h, bn, None, "tail_bn")
        } else {
            let h = self.batchnorm(h, "tail_bn");
            elementwise::swish(self.g, h, "tail_swish")
        };
        let (w, bias) = (self.p("tail_conv.weight"), self.p("tail_conv.bias"));
        let h = conv::conv2d(self.g, h, w, Some(bias), 1, 1, "tail_conv");
        let (w, bias) = self.conv_params("T_output_layer", "last_bn");
        let o = conv::conv3d_331(self.g, h, w, Some(bias), "T_output_layer");
        let h = if self.train {
            let bn = self.bn("last_bn");
            batchnorm::batchnorm_train_swish(self.g, o, bn, Some(h), "last_bn")
        } else {
            let o = elementwise::swish(self.g, o, "last_swish");
            elementwise::add(self.g, o, h, "output_residual")
        };
        readout::membrane_readout(self.g, h, self.t, readout::DECAY, "membrane_output")
    }
}

/// Append the inference-mode U-Net to `g`: x [B, C, H, W] (f32), t [B] (u32 timesteps) -> eps.
/// BatchNorm uses running statistics; every neuron is the config's, firing at `v_th` (threshold
/// guidance; 1.0 as trained).
pub fn build_eval(g: &mut Graph, cfg: &ModelConfig, x: TensorId, t: TensorId, v_th: f32) -> UNet {
    build(g, cfg, x, t, cfg.neuron_at(v_th), None)
}

/// Append the training-mode U-Net: BatchNorm over the batch statistics of all T*B*H*W values
/// (running statistics updated in place), neurons saving their membranes, every op recorded on
/// the tape for [`crate::graph::backward`]. With `bn_groups`, BatchNorm normalises each group of
/// the batch by its own statistics (see [`BnGroups`]).
pub fn build_train(g: &mut Graph, cfg: &ModelConfig, x: TensorId, t: TensorId, bn_groups: BnGroups) -> UNet {
    build(g, cfg, x, t, cfg.neuron_at(1.0), Some(bn_groups))
}

/// `train`: the training form with those BatchNorm groups; None: inference.
fn builder<'a>(
    g: &'a mut Graph,
    cfg: &'a ModelConfig,
    params: Params,
    neuron: Neuron,
    train: Option<BnGroups>,
) -> Builder<'a> {
    Builder {
        g,
        cfg,
        params,
        folds: Vec::new(),
        t: cfg.snn_steps,
        neuron,
        train: train.is_some(),
        bn_groups: train.unwrap_or(BnGroups::ONE),
        spikes: Vec::new(),
    }
}

/// Every state_dict entry of the reference model, in the reference's order: the builder's
/// recording pass over the skeleton.
pub fn state_entries(cfg: &ModelConfig) -> Vec<Entry> {
    let mut scratch = Graph::new();
    let mut b = builder(&mut scratch, cfg, Params::recording(), cfg.neuron_at(1.0), Some(BnGroups::ONE));
    walk(&arch(cfg), &mut b, TensorId(0), TensorId(0));
    b.params.entries()
}

fn build(g: &mut Graph, cfg: &ModelConfig, x: TensorId, t: TensorId, neuron: Neuron, train: Option<BnGroups>) -> UNet {
    let mut b = builder(g, cfg, Params::building(state_entries(cfg)), neuron, train);
    if b.train {
        // Training updates every parameter and statistic: declare them all first.
        b.params.declare_all(b.g);
    }
    let eps = walk(&arch(cfg), &mut b, x, t);
    UNet { params: b.params.finish(), eps, spikes: b.spikes, folds: b.folds, dropout_key: None }
}

/// The time embedding's entries and, building, its graph: [`time_mlp`] over the
/// `time_embedding.timembedding.{0,1,3}` tensors (both U-Nets).
pub(crate) fn time_embedding(
    g: &mut Graph,
    params: &mut Params,
    t: TensorId,
    [steps, ch, tdim]: [usize; 3],
) -> TensorId {
    params.time_embedding(steps, ch, tdim);
    if params.is_recording() {
        return t;
    }
    let mlp = TIME_MLP.map(|n| params.get(g, n));
    time_mlp(g, t, mlp)
}

/// The parameters of [`time_mlp`], by official name, in its argument order.
pub(crate) const TIME_MLP: [&str; 5] = [
    "time_embedding.timembedding.0.weight",
    "time_embedding.timembedding.1.weight",
    "time_embedding.timembedding.1.bias",
    "time_embedding.timembedding.3.weight",
    "time_embedding.timembedding.3.bias",
];

/// The time embedding both U-Nets share: table lookup, Linear, Swish, Linear, and the Swish every
/// temb_proj starts with (computed once). `[table, w1, b1, w3, b3]` are the
/// `time_embedding.timembedding.{0,1,3}` tensors; returns Swish(temb) [B, tdim].
pub(crate) fn time_mlp(g: &mut Graph, t: TensorId, [table, w1, b1, w3, b3]: [TensorId; 5]) -> TensorId {
    let e = embedding::gather_rows(g, table, t, "time_embedding.table");
    let e = matmul::linear(g, e, w1, Some(b1), "time_embedding.timembedding.1");
    let e = elementwise::swish(g, e, "time_embedding.timembedding.2");
    let temb = matmul::linear(g, e, w3, Some(b3), "time_embedding.timembedding.3");
    elementwise::swish(g, temb, "temb_proj.0")
}
