//! The U-Net skeleton both models share: down levels of ResBlocks with a downsample between
//! levels, two middle ResBlocks, up levels of one ResBlock more than down (each concatenating the
//! skip of its mirror) with an upsample between levels. Block names are the state_dict's
//! (`downblocks.N`, `middleblocks.N`, `upblocks.N`); what a block computes is each model's
//! [`BlockBuilder`] (src/model/unet.rs for the spiking U-Net, src/model/ddpm.rs for the ANN),
//! and [`walk`] is the one walk of the skeleton: it yields the state entries (a builder's
//! recording pass, src/model/params.rs) and the graph, from which the MAC counts are read
//! (src/model/macs.rs). A new block type is a [`Block`] variant and its arm in each builder.

use crate::graph::TensorId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// A residual block cin -> cout, then self-attention (`{name}.attn`) when `attn`. SNN:
    /// Spk_ResBlock (IF, conv1, BN1, + temb proj, IF, conv2, BN2, + shortcut(x)); ANN: ResBlock
    /// (GN, Swish, conv, + temb proj, GN, Swish, dropout, conv, + shortcut(x)).
    Res { name: String, cin: usize, cout: usize, attn: bool },
    /// Downsample by 2 (SNN: IF, conv 3x3 stride 2, BN; ANN: conv 3x3 stride 2, `main`).
    Down { name: String, c: usize },
    /// Upsample by 2 (SNN: IF, nearest x2, conv 3x3, BN; ANN: nearest x2, conv 3x3, `main`).
    Up { name: String, c: usize },
}

impl Block {
    pub fn name(&self) -> &str {
        match self {
            Block::Res { name, .. } | Block::Down { name, .. } | Block::Up { name, .. } => name,
        }
    }
    pub fn out_channels(&self) -> usize {
        match self {
            Block::Res { cout, .. } => *cout,
            Block::Down { c, .. } | Block::Up { c, .. } => *c,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Arch {
    pub down: Vec<Block>,
    pub middle: Vec<Block>,
    pub up: Vec<Block>,
    /// Channels after the last up block (input of the tail).
    pub tail_ch: usize,
}

impl Arch {
    /// Every block, down, middle and up, in graph order.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.down.iter().chain(&self.middle).chain(&self.up)
    }
}

/// The skeleton of a U-Net with `ch` base channels, a level per multiplier of `ch_mult`,
/// `num_res_blocks` ResBlocks per down level (one more per up level), attention in the ResBlocks
/// of the levels in `attn` and in middle block i when `middle_attn[i]`.
pub fn skeleton(ch: usize, ch_mult: &[usize], num_res_blocks: usize, attn: &[usize], middle_attn: [bool; 2]) -> Arch {
    let mut down = Vec::new();
    let mut skip_ch = vec![ch];
    let mut now = ch;
    for (i, &mult) in ch_mult.iter().enumerate() {
        for _ in 0..num_res_blocks {
            let name = format!("downblocks.{}", down.len());
            down.push(Block::Res { name, cin: now, cout: ch * mult, attn: attn.contains(&i) });
            now = ch * mult;
            skip_ch.push(now);
        }
        if i + 1 != ch_mult.len() {
            down.push(Block::Down { name: format!("downblocks.{}", down.len()), c: now });
            skip_ch.push(now);
        }
    }
    let middle = (0..2)
        .map(|i| Block::Res { name: format!("middleblocks.{i}"), cin: now, cout: now, attn: middle_attn[i] })
        .collect();
    let mut up = Vec::new();
    for (i, &mult) in ch_mult.iter().enumerate().rev() {
        for _ in 0..=num_res_blocks {
            let skip = skip_ch.pop().expect("one skip per up ResBlock");
            let name = format!("upblocks.{}", up.len());
            up.push(Block::Res { name, cin: now + skip, cout: ch * mult, attn: attn.contains(&i) });
            now = ch * mult;
        }
        if i != 0 {
            up.push(Block::Up { name: format!("upblocks.{}", up.len()), c: now });
        }
    }
    Arch { down, middle, up, tail_ch: now }
}

/// What one model builds at each point of the skeleton. Each method first declares the state
/// entries of the modules it builds, in the reference's registration order, and returns its
/// input unchanged when the builder is recording (src/model/params.rs); building, it appends
/// the ops to the graph and returns the output.
pub(crate) trait BlockBuilder {
    /// The time embedding from timesteps t [B]: what every block's temb_proj reads.
    fn time_embedding(&mut self, t: TensorId) -> TensorId;
    /// The stem: image x [B, C, H, W] -> the first feature map (the first skip).
    fn stem(&mut self, x: TensorId) -> TensorId;
    fn block(&mut self, block: &Block, x: TensorId, temb: TensorId) -> TensorId;
    /// An up ResBlock's input: h with the skip of its mirror appended along channels.
    fn concat(&mut self, h: TensorId, skip: TensorId, name: &str) -> TensorId;
    /// The tail: the last up block's output (`ch` channels) -> eps.
    fn tail(&mut self, h: TensorId, ch: usize) -> TensorId;
}

/// Walk the skeleton once with `b`: time embedding, stem, down blocks (each output a skip),
/// middle blocks, up blocks (each ResBlock first concatenating the latest skip), tail.
pub(crate) fn walk(arch: &Arch, b: &mut impl BlockBuilder, x: TensorId, t: TensorId) -> TensorId {
    let temb = b.time_embedding(t);
    let mut h = b.stem(x);
    let mut skips = vec![h];
    for block in &arch.down {
        h = b.block(block, h, temb);
        skips.push(h);
    }
    for block in &arch.middle {
        h = b.block(block, h, temb);
    }
    for block in &arch.up {
        if let Block::Res { name, .. } = block {
            let skip = skips.pop().expect("one skip per up ResBlock");
            h = b.concat(h, skip, &format!("{name}.concat"));
        }
        h = b.block(block, h, temb);
    }
    b.tail(h, arch.tail_ch)
}
