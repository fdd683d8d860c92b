//! Training data: MNIST / Fashion-MNIST IDX files (raw or .gz), CIFAR-10 binary batches, folders
//! of PNG/JPEG images, and the embedded MNIST subset. Images become f32 in [-1, 1], [C, S, S],
//! with the reference's preprocessing; batches are assembled on a background thread.
//!
//! Every batch is a pure function of (seed, step): the epoch's permutation comes from
//! (seed, epoch) and the flips from (seed, step), so a resumed run sees exactly the batches an
//! uninterrupted one would have.

mod formats;
mod loader;

pub use formats::{detect, load, Dataset, Format};
pub use loader::{batch_at, share_at, Loader};
