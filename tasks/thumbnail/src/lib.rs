//! `thumbnail`: honest CPU work, no host calls.
//!
//! Generates a deterministic RGB image (xorshift noise over a gradient),
//! shrinks it to a square thumbnail with a box filter and returns an FNV-1a
//! checksum of the thumbnail's bytes. The same arguments always give the
//! same checksum, on any machine, natively or in wasm.
//!
//! The algorithm is the plain function [`make_thumbnail`], so the host's
//! benchmark can run exactly the same code natively and compare.

use serde::{Deserialize, Serialize};
use wasmq_guest::{Job, TaskError};

/// Payload; every field is optional: `{}` renders 512×512 → 64×64.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Args {
    /// Source image width in pixels.
    pub width: u32,
    /// Source image height in pixels.
    pub height: u32,
    /// Seed of the noise; different seeds give different images.
    pub seed: u64,
    /// Side of the square thumbnail in pixels.
    pub thumb: u32,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            width: 512,
            height: 512,
            seed: 1,
            thumb: 64,
        }
    }
}

/// The job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Thumbnail {
    /// Source width.
    pub width: u32,
    /// Source height.
    pub height: u32,
    /// Thumbnail side.
    pub thumb: u32,
    /// FNV-1a (64-bit) of the thumbnail's RGB bytes, as 16 hex digits.
    pub checksum: String,
}

/// Largest accepted source side: keeps a typo from asking for terabytes.
pub const MAX_SIDE: u32 = 8192;

/// Renders the source image and its thumbnail; pure computation.
///
/// Fails if a side is 0, the source is larger than [`MAX_SIDE`], or the
/// thumbnail is larger than the source.
pub fn make_thumbnail(args: &Args) -> Result<Thumbnail, String> {
    let (w, h, t) = (args.width, args.height, args.thumb);
    if w == 0 || h == 0 || t == 0 {
        return Err("width, height and thumb must be positive".into());
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!("source is larger than {MAX_SIDE}x{MAX_SIDE}"));
    }
    if t > w || t > h {
        return Err(format!("thumb {t} is larger than the {w}x{h} source"));
    }
    let image = render(w as usize, h as usize, args.seed);
    let small = box_filter(&image, w as usize, h as usize, t as usize);
    Ok(Thumbnail {
        width: w,
        height: h,
        thumb: t,
        checksum: format!("{:016x}", fnv1a(&small)),
    })
}

/// A `w`×`h` RGB image: a diagonal gradient plus xorshift noise.
fn render(w: usize, h: usize, seed: u64) -> Vec<u8> {
    // xorshift64 must not start at 0 (it would stay 0).
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut img = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let noise = next();
            let gx = (x * 255 / w) as u32;
            let gy = (y * 255 / h) as u32;
            let px = [gx, gy, (gx + gy) / 2];
            for (c, base) in px.into_iter().enumerate() {
                // Up to ±32 of noise per channel, clamped to a byte.
                let n = ((noise >> (c * 8)) & 0x3F) as i32 - 32;
                img.push((base as i32 + n).clamp(0, 255) as u8);
            }
        }
    }
    img
}

/// Shrinks a `w`×`h` RGB image to `t`×`t`: each output pixel is the mean of
/// the source pixels its box covers.
fn box_filter(img: &[u8], w: usize, h: usize, t: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(t * t * 3);
    for ty in 0..t {
        let (y0, y1) = (ty * h / t, (ty + 1) * h / t);
        for tx in 0..t {
            let (x0, x1) = (tx * w / t, (tx + 1) * w / t);
            let mut sum = [0u64; 3];
            for y in y0..y1 {
                let row = &img[(y * w + x0) * 3..(y * w + x1) * 3];
                for px in row.chunks_exact(3) {
                    sum[0] += u64::from(px[0]);
                    sum[1] += u64::from(px[1]);
                    sum[2] += u64::from(px[2]);
                }
            }
            let n = ((y1 - y0) * (x1 - x0)) as u64;
            out.extend(sum.map(|s| (s / n) as u8));
        }
    }
    out
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Invalid sizes are a permanent failure: the same arguments fail again.
#[wasmq_guest::task]
fn run(_job: &Job, args: Args) -> Result<Thumbnail, TaskError> {
    make_thumbnail(&args).map_err(TaskError::fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = make_thumbnail(&Args::default()).unwrap();
        assert_eq!(a, make_thumbnail(&Args::default()).unwrap());
        let other = Args {
            seed: 2,
            ..Args::default()
        };
        assert_ne!(a.checksum, make_thumbnail(&other).unwrap().checksum);
    }

    #[test]
    fn rejects_bad_sizes() {
        let bad = Args {
            thumb: 1024,
            ..Args::default()
        };
        assert!(make_thumbnail(&bad).is_err());
    }
}
