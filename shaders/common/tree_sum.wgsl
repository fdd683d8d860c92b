// common/tree_sum.wgsl: a deterministic workgroup sum, prepended to the shaders that reduce
// (see `shader!`). Every invocation passes its partial; a fixed-shape tree in workgroup memory
// adds them in the same order every time (no atomics), and every invocation gets the total.
// Call it from uniform control flow only.

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

fn workgroup_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

