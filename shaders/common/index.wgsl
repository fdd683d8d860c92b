// common/index.wgsl: the flat invocation index of a 1-D kernel with 256-wide workgroups spread
// over x and y (graph::grid_1d keeps each dimension under the 65535 limit), prepended to the
// shaders that use one (see `shader!`). The caller bounds-checks it: the last workgroup runs past
// the end, and the grid is up to 32767 workgroups wider than needed once y > 1.

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

