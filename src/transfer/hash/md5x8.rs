//! MD5 of eight independent messages at once, one per 32-bit lane of AVX2 registers: the
//! rounds are the same for every message, so eight digests cost little more than one. Used
//! when several files are hashed at the same time (many blobs downloading, many files
//! uploading); one file alone goes through the scalar code.

use std::arch::x86_64::*;

use super::md5::K;

/// Whether this CPU can run [`compress8`] (checked once; std caches the answer).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
}

/// Compresses `blocks` 64-byte blocks of each lane's data into that lane's state.
///
/// # Safety
/// The CPU must support AVX2 ([`available`]).
///
/// # Panics
/// When a lane holds fewer than `blocks * 64` bytes.
#[target_feature(enable = "avx2")]
pub unsafe fn compress8(states: &mut [[u32; 4]; 8], lanes: [&[u8]; 8], blocks: usize) {
    assert!(
        lanes.iter().all(|l| l.len() >= blocks * 64),
        "a lane is shorter than the blocks asked for"
    );
    unsafe {
        let load = |i: usize| {
            _mm256_setr_epi32(
                states[0][i] as i32,
                states[1][i] as i32,
                states[2][i] as i32,
                states[3][i] as i32,
                states[4][i] as i32,
                states[5][i] as i32,
                states[6][i] as i32,
                states[7][i] as i32,
            )
        };
        let (mut a, mut b, mut c, mut d) = (load(0), load(1), load(2), load(3));
        for blk in 0..blocks {
            // Transpose: m[w] holds word w of this block from every lane.
            let mut m = [_mm256_setzero_si256(); 16];
            for half in 0..2 {
                let mut r = [_mm256_setzero_si256(); 8];
                for l in 0..8 {
                    r[l] = _mm256_loadu_si256(
                        lanes[l].as_ptr().add(blk * 64 + half * 32) as *const __m256i
                    );
                }
                let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
                let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
                let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
                let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
                let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
                let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
                let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
                let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
                let u0 = _mm256_unpacklo_epi64(t0, t2);
                let u1 = _mm256_unpackhi_epi64(t0, t2);
                let u2 = _mm256_unpacklo_epi64(t1, t3);
                let u3 = _mm256_unpackhi_epi64(t1, t3);
                let u4 = _mm256_unpacklo_epi64(t4, t6);
                let u5 = _mm256_unpackhi_epi64(t4, t6);
                let u6 = _mm256_unpacklo_epi64(t5, t7);
                let u7 = _mm256_unpackhi_epi64(t5, t7);
                let o = half * 8;
                m[o] = _mm256_permute2x128_si256(u0, u4, 0x20);
                m[o + 1] = _mm256_permute2x128_si256(u1, u5, 0x20);
                m[o + 2] = _mm256_permute2x128_si256(u2, u6, 0x20);
                m[o + 3] = _mm256_permute2x128_si256(u3, u7, 0x20);
                m[o + 4] = _mm256_permute2x128_si256(u0, u4, 0x31);
                m[o + 5] = _mm256_permute2x128_si256(u1, u5, 0x31);
                m[o + 6] = _mm256_permute2x128_si256(u2, u6, 0x31);
                m[o + 7] = _mm256_permute2x128_si256(u3, u7, 0x31);
            }
            let (aa, bb, cc, dd) = (a, b, c, d);
            let ones = _mm256_set1_epi32(-1);
            macro_rules! step {
                ($f:expr, $a:ident, $b:ident, $w:expr, $i:expr, $s:expr) => {
                    let k = _mm256_set1_epi32(K[$i] as i32);
                    let t = _mm256_add_epi32(_mm256_add_epi32($a, _mm256_add_epi32(m[$w], k)), $f);
                    let r = _mm256_or_si256(
                        _mm256_slli_epi32::<$s>(t),
                        _mm256_srli_epi32::<{ 32 - $s }>(t),
                    );
                    $a = _mm256_add_epi32(r, $b);
                };
            }
            macro_rules! ff {
                ($a:ident,$b:ident,$c:ident,$d:ident,$w:expr,$i:expr,$s:expr) => {
                    step!(
                        _mm256_xor_si256($d, _mm256_and_si256($b, _mm256_xor_si256($c, $d))),
                        $a,
                        $b,
                        $w,
                        $i,
                        $s
                    );
                };
            }
            macro_rules! gg {
                ($a:ident,$b:ident,$c:ident,$d:ident,$w:expr,$i:expr,$s:expr) => {
                    step!(
                        _mm256_or_si256(_mm256_and_si256($b, $d), _mm256_andnot_si256($d, $c)),
                        $a,
                        $b,
                        $w,
                        $i,
                        $s
                    );
                };
            }
            macro_rules! hh {
                ($a:ident,$b:ident,$c:ident,$d:ident,$w:expr,$i:expr,$s:expr) => {
                    step!(
                        _mm256_xor_si256(_mm256_xor_si256($b, $c), $d),
                        $a,
                        $b,
                        $w,
                        $i,
                        $s
                    );
                };
            }
            macro_rules! ii {
                ($a:ident,$b:ident,$c:ident,$d:ident,$w:expr,$i:expr,$s:expr) => {
                    step!(
                        _mm256_xor_si256($c, _mm256_or_si256($b, _mm256_xor_si256($d, ones))),
                        $a,
                        $b,
                        $w,
                        $i,
                        $s
                    );
                };
            }
            ff!(a, b, c, d, 0, 0, 7);
            ff!(d, a, b, c, 1, 1, 12);
            ff!(c, d, a, b, 2, 2, 17);
            ff!(b, c, d, a, 3, 3, 22);
            ff!(a, b, c, d, 4, 4, 7);
            ff!(d, a, b, c, 5, 5, 12);
            ff!(c, d, a, b, 6, 6, 17);
            ff!(b, c, d, a, 7, 7, 22);
            ff!(a, b, c, d, 8, 8, 7);
            ff!(d, a, b, c, 9, 9, 12);
            ff!(c, d, a, b, 10, 10, 17);
            ff!(b, c, d, a, 11, 11, 22);
            ff!(a, b, c, d, 12, 12, 7);
            ff!(d, a, b, c, 13, 13, 12);
            ff!(c, d, a, b, 14, 14, 17);
            ff!(b, c, d, a, 15, 15, 22);
            gg!(a, b, c, d, 1, 16, 5);
            gg!(d, a, b, c, 6, 17, 9);
            gg!(c, d, a, b, 11, 18, 14);
            gg!(b, c, d, a, 0, 19, 20);
            gg!(a, b, c, d, 5, 20, 5);
            gg!(d, a, b, c, 10, 21, 9);
            gg!(c, d, a, b, 15, 22, 14);
            gg!(b, c, d, a, 4, 23, 20);
            gg!(a, b, c, d, 9, 24, 5);
            gg!(d, a, b, c, 14, 25, 9);
            gg!(c, d, a, b, 3, 26, 14);
            gg!(b, c, d, a, 8, 27, 20);
            gg!(a, b, c, d, 13, 28, 5);
            gg!(d, a, b, c, 2, 29, 9);
            gg!(c, d, a, b, 7, 30, 14);
            gg!(b, c, d, a, 12, 31, 20);
            hh!(a, b, c, d, 5, 32, 4);
            hh!(d, a, b, c, 8, 33, 11);
            hh!(c, d, a, b, 11, 34, 16);
            hh!(b, c, d, a, 14, 35, 23);
            hh!(a, b, c, d, 1, 36, 4);
            hh!(d, a, b, c, 4, 37, 11);
            hh!(c, d, a, b, 7, 38, 16);
            hh!(b, c, d, a, 10, 39, 23);
            hh!(a, b, c, d, 13, 40, 4);
            hh!(d, a, b, c, 0, 41, 11);
            hh!(c, d, a, b, 3, 42, 16);
            hh!(b, c, d, a, 6, 43, 23);
            hh!(a, b, c, d, 9, 44, 4);
            hh!(d, a, b, c, 12, 45, 11);
            hh!(c, d, a, b, 15, 46, 16);
            hh!(b, c, d, a, 2, 47, 23);
            ii!(a, b, c, d, 0, 48, 6);
            ii!(d, a, b, c, 7, 49, 10);
            ii!(c, d, a, b, 14, 50, 15);
            ii!(b, c, d, a, 5, 51, 21);
            ii!(a, b, c, d, 12, 52, 6);
            ii!(d, a, b, c, 3, 53, 10);
            ii!(c, d, a, b, 10, 54, 15);
            ii!(b, c, d, a, 1, 55, 21);
            ii!(a, b, c, d, 8, 56, 6);
            ii!(d, a, b, c, 15, 57, 10);
            ii!(c, d, a, b, 6, 58, 15);
            ii!(b, c, d, a, 13, 59, 21);
            ii!(a, b, c, d, 4, 60, 6);
            ii!(d, a, b, c, 11, 61, 10);
            ii!(c, d, a, b, 2, 62, 15);
            ii!(b, c, d, a, 9, 63, 21);
            a = _mm256_add_epi32(a, aa);
            b = _mm256_add_epi32(b, bb);
            c = _mm256_add_epi32(c, cc);
            d = _mm256_add_epi32(d, dd);
        }
        let mut out = [[0u32; 8]; 4];
        for (i, v) in [a, b, c, d].into_iter().enumerate() {
            _mm256_storeu_si256(out[i].as_mut_ptr() as *mut __m256i, v);
        }
        for l in 0..8 {
            for i in 0..4 {
                states[l][i] = out[i][l];
            }
        }
    }
}
