//! Tuning keys that hold for every batch size, so a user tunes once per adapter and model (and
//! image size), not once per `--batch` or `--n`: training, its sample grids, `sample`, `fid`,
//! `profile` and `--resume` share one set of measurements.
//!
//! A key (see [`crate::graph::Graph::tuning_key`]) prints a node's family, shapes, parameters and
//! whatever else the op family puts there. Which of its numbers follow the batch is learnt, not
//! assumed: the caller also builds the same graph for another batch, and a number that differs
//! between the two keys and is proportional to the batch (k * B in both) is written `kB`. So
//! `conv::conv2d in [32, 16, 16, 16] ...` at batch 8 with 4 spiking steps becomes
//! `conv::conv2d in [4B, 16, 16, 16] ...`. Nothing here knows an op family or a variant.

/// Runs of ASCII digits and the text between them.
fn tokens(key: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = key.as_bytes();
    for i in 1..=bytes.len() {
        if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[i - 1].is_ascii_digit() {
            out.push(&key[start..i]);
            start = i;
        }
    }
    out
}

/// `key` of a node in a graph built for `batch` images, with every number that follows the batch
/// written as a multiple of B, learnt from `other`, the same node's key in the graph built for
/// `other_batch` images. None when the two do not line up: other text, another count of numbers,
/// or a number that changes with the batch without being proportional to it (then the exact key
/// is the only safe one).
pub fn general_key(key: &str, batch: usize, other: &str, other_batch: usize) -> Option<String> {
    if batch == other_batch || batch == 0 || other_batch == 0 {
        return None;
    }
    let (a, b) = (tokens(key), tokens(other));
    if a.len() != b.len() {
        return None;
    }
    let mut out = String::with_capacity(key.len());
    for (x, y) in a.iter().zip(&b) {
        if x == y {
            out.push_str(x);
            continue;
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if !(digits(x) && digits(y)) {
            return None;
        }
        let (u, v): (u128, u128) = (x.parse().ok()?, y.parse().ok()?);
        // u = k * batch and v = k * other_batch for one whole k.
        if u % batch as u128 != 0 || u / batch as u128 * other_batch as u128 != v {
            return None;
        }
        let k = u / batch as u128;
        if k != 1 {
            out.push_str(&k.to_string());
        }
        out.push('B');
    }
    Some(out)
}

/// The batch to build the second graph for: one image less (it builds whenever `batch` does), or
/// two for a batch of one.
pub fn other_batch(batch: usize) -> usize {
    if batch > 1 {
        batch - 1
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_that_follow_the_batch_become_multiples_of_b() {
        let a = "conv::conv2d in [32, 16, 32, 32],[16, 16, 3, 3] out [32, 16, 32, 32] p [32, 16, 524288]";
        let b = "conv::conv2d in [28, 16, 32, 32],[16, 16, 3, 3] out [28, 16, 32, 32] p [28, 16, 458752]";
        assert_eq!(
            general_key(a, 8, b, 7).unwrap(),
            "conv::conv2d in [4B, 16, 32, 32],[16, 16, 3, 3] out [4B, 16, 32, 32] p [4B, 16, 65536B]"
        );
        // The same node at another batch gets the same key.
        let c = "conv::conv2d in [64, 16, 32, 32],[16, 16, 3, 3] out [64, 16, 32, 32] p [64, 16, 1048576]";
        assert_eq!(general_key(c, 16, b, 7), general_key(a, 8, b, 7));
        // A batch of one: 16 is the channel count, not the batch, and stays.
        assert_eq!(general_key("m [1, 16]", 1, "m [2, 16]", 2).unwrap(), "m [B, 16]");
    }

    #[test]
    fn keys_that_do_not_line_up_stay_exact() {
        assert_eq!(general_key("a [8]", 8, "b [7]", 7), None, "other text");
        assert_eq!(general_key("a [8, 1]", 8, "a [7]", 7), None, "another count of numbers");
        assert_eq!(general_key("a [2]", 8, "a [3]", 7), None, "changes, but not with the batch");
        assert_eq!(general_key("a [8]", 8, "a [8]", 8), None, "same batch: nothing to learn");
        assert_eq!(general_key("a [5]", 8, "a [5]", 7).unwrap(), "a [5]", "nothing follows the batch");
    }
}
