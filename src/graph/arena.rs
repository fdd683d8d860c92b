//! Arenas: many tensors in one buffer, each a view at a 256-byte aligned offset.
//!
//! A tensor placed in an arena ([`Graph::arena`]) keeps its id, name, shape and role; only its
//! storage moves: it is bound as a window of the arena's buffer, and reads and writes of it go
//! to that window. Kernels that treat a whole set of tensors alike (the gradient norm, the
//! optimizer step) then bind the arena once instead of once per tensor. Members start at
//! multiples of [`ARENA_ALIGN`] elements (256 bytes, the largest storage-offset alignment WebGPU
//! lets an adapter require), so every member can still be bound on its own; the padding after a
//! member is never read as data: arena kernels walk a chunk table ([`Layout::chunks`]) that covers
//! the members exactly. Several arenas may share one [`Layout`] (parameters, gradients and the two
//! Adam moments do), so one index addresses the same element of each.

use std::ops::Range;
use std::sync::Arc;

use super::{DType, Graph, Role, TensorId};

/// Members start at multiples of this many f32 elements (256 bytes).
pub const ARENA_ALIGN: usize = 64;

/// Largest arena: WebGPU's default `max_storage_buffer_binding_size` (lavapipe's limit), so an
/// arena binds on every adapter that can bind its largest member.
pub const ARENA_MAX_BYTES: u64 = 128 << 20;

/// Elements of one chunk of [`Layout::chunks`]: one workgroup of an arena kernel (256
/// invocations, 4 vec4 each).
pub const ARENA_CHUNK: usize = 4096;

/// Where a tensor's storage lives when it is not a buffer of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The arena tensor holding it.
    pub base: TensorId,
    /// Byte offset in the arena (a multiple of 256).
    pub offset: u64,
}

/// The members of an arena, in order: element offsets (multiples of [`ARENA_ALIGN`]) and lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub offsets: Vec<usize>,
    pub lens: Vec<usize>,
    /// Elements of the arena: the last member's end, rounded up to [`ARENA_ALIGN`].
    pub numel: usize,
}

impl Layout {
    /// Members of `lens` elements packed in order, each at the next aligned offset.
    pub fn packed(lens: &[usize]) -> Layout {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &n in lens {
            offsets.push(at);
            at += n.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        }
        Layout { offsets, lens: lens.to_vec(), numel: at.max(ARENA_ALIGN) }
    }

    pub fn bytes(&self) -> u64 {
        4 * self.numel as u64
    }

    /// The members as (start, len) element ranges of at most `chunk` elements (a multiple of 4)
    /// that never cross a member's end: the table arena kernels give one workgroup per entry.
    /// Every start is a multiple of 4, so a chunk is whole vec4s but for its member's last one.
    pub fn chunks(&self, chunk: usize) -> Vec<[u32; 2]> {
        assert!(chunk > 0 && chunk.is_multiple_of(4), "chunks must be whole vec4s, got {chunk}");
        let mut out = Vec::new();
        for (&off, &len) in self.offsets.iter().zip(&self.lens) {
            let mut done = 0;
            while done < len {
                let n = chunk.min(len - done);
                out.push([(off + done) as u32, n as u32]);
                done += n;
            }
        }
        out
    }
}

/// Split members of `lens` elements, in order, into as few consecutive groups as packed arenas of
/// at most `max_bytes` allow (a member larger than that gets an arena of its own), balanced: the
/// largest group is as small as that many groups allow.
pub fn split_members(lens: &[usize], max_bytes: u64) -> Vec<Range<usize>> {
    let sizes: Vec<u64> = lens.iter().map(|&n| 4 * (n.div_ceil(ARENA_ALIGN) * ARENA_ALIGN) as u64).collect();
    // Greedy packing under `cap`: fewest groups for that cap.
    let greedy = |cap: u64| {
        let mut groups = Vec::new();
        let (mut start, mut bytes) = (0, 0u64);
        for (i, &b) in sizes.iter().enumerate() {
            if i > start && bytes + b > cap {
                groups.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += b;
        }
        if start < sizes.len() {
            groups.push(start..sizes.len());
        }
        groups
    };
    let k = greedy(max_bytes).len();
    // The smallest cap that still needs no more than k groups (fewer groups as the cap grows).
    let (mut lo, mut hi) = (1u64, max_bytes.max(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if greedy(mid).len() <= k {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    greedy(lo)
}

impl Graph {
    /// A new arena tensor `name` of `role` holding `members` at `layout` (built for their lengths,
    /// in this order). Members must be F32 tensors of `role` that live in no arena yet. Returns
    /// the arena tensor: bind it to treat every member in one dispatch.
    pub fn arena(&mut self, name: &str, role: Role, members: &[TensorId], layout: &Layout) -> TensorId {
        assert_eq!(
            members.len(),
            layout.lens.len(),
            "arena '{name}': {} members, layout for {}",
            members.len(),
            layout.lens.len()
        );
        let base = self.add(name.to_string(), &[layout.numel], role, DType::F32);
        self.arenas.insert(base);
        for (k, &m) in members.iter().enumerate() {
            let info = &self.tensors[m.0];
            assert!(
                info.role == role && info.dtype == DType::F32 && info.view.is_none() && !self.is_arena(m),
                "arena '{name}': member '{}' must be an f32 {role:?} tensor in no other arena (it is {:?} {}{})",
                info.name,
                info.role,
                info.dtype.name(),
                if info.view.is_some() { ", already placed" } else { "" }
            );
            assert_eq!(
                info.numel(),
                layout.lens[k],
                "arena '{name}': member '{}' does not match the layout",
                info.name
            );
            self.tensors[m.0].view = Some(View { base, offset: 4 * layout.offsets[k] as u64 });
        }
        base
    }

    /// Whether some tensor is placed in `t`.
    pub fn is_arena(&self, t: TensorId) -> bool {
        self.arenas.contains(&t)
    }

    /// The tensor whose buffer holds `t` (its arena, or `t` itself) and `t`'s byte offset in it.
    pub fn storage(&self, t: TensorId) -> (TensorId, u64) {
        self.tensors[t.0].view.map_or((t, 0), |v| (v.base, v.offset))
    }

    /// A read-only table uploaded once when the plan is compiled (Role::Param, dtype U32).
    pub fn constant_u32(&mut self, name: &str, shape: &[usize], data: Vec<u32>) -> TensorId {
        let t = self.add(name.to_string(), shape, Role::Param, DType::U32);
        assert_eq!(data.len(), self.tensors[t.0].numel(), "constant '{name}' {shape:?}: {} words", data.len());
        self.tensors[t.0].init = Some(Arc::from(data));
        t
    }

    /// A node binding one arena both read-only and writable (two members, or a member and the
    /// arena): WebGPU forbids that within a dispatch. Checked by [`Graph::check`].
    pub(super) fn arena_conflict(&self) -> Option<String> {
        for n in &self.nodes {
            for &w in &n.writes {
                let (wb, _) = self.storage(w);
                if let Some(&r) = n.reads.iter().find(|&&r| self.storage(r).0 == wb) {
                    return Some(format!(
                        "node '{}' ({}::{}) reads '{}' and writes '{}', both in arena '{}': a dispatch may not bind one buffer read-only and writable",
                        n.label,
                        n.shader.name,
                        n.entry,
                        self.tensors[r.0].name,
                        self.tensors[w.0].name,
                        self.tensors[wb.0].name
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_layout_aligns_members_and_chunks_cover_them_exactly() {
        let l = Layout::packed(&[1, 64, 65, 4097, 3]);
        assert_eq!(l.offsets, [0, 64, 128, 256, 4416]);
        assert_eq!(l.numel, 4480);
        let chunks = l.chunks(ARENA_CHUNK);
        assert_eq!(chunks, [[0, 1], [64, 64], [128, 65], [256, 4096], [4352, 1], [4416, 3]]);
        let covered: usize = chunks.iter().map(|c| c[1] as usize).sum();
        assert_eq!(covered, l.lens.iter().sum::<usize>());
        assert!(chunks.iter().all(|c| c[0] % 4 == 0));
    }

    #[test]
    fn members_split_into_arenas_under_the_cap() {
        // 64-element members are 256 bytes each: three fit 768 bytes.
        assert_eq!(split_members(&[64; 7], 768), [0..3, 3..6, 6..7]);
        assert_eq!(split_members(&[10_000, 1], 256), [0..1, 1..2], "an oversized member stands alone");
        // Balanced: nine 256-byte members under a 1 KiB cap make 3 + 3 + 3, not 4 + 4 + 1.
        assert_eq!(split_members(&[64; 9], 1024), [0..3, 3..6, 6..9]);
        assert_eq!(split_members(&[], 256), Vec::<Range<usize>>::new());
    }
}
