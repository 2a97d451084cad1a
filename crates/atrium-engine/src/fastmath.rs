//! `exp` eight lanes at a time, for attention's softmax and the SiLU of the
//! feed-forward layers.
//!
//! A call to libm's `expf` per attention score cost more than the score's
//! 64 multiply-adds. This is Cephes' `expf` (range reduction by ln 2 in two
//! parts, a degree-6 polynomial, the exponent put in by bits) in vector
//! registers: within 2 ulp of `f32::exp` on the range softmax uses, and 0
//! below it.

/// Below this `exp` is under f32's smallest normal number: 0 is returned.
const LOWEST: f32 = -87.0;
/// Larger arguments are clamped here (exp(88) is finite; SiLU's use of it
/// then gives -0 as infinity would).
const HIGHEST: f32 = 88.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `exp` of sixteen values.
pub fn exp16(x: [f32; 16]) -> [f32; 16] {
    let lo = exp8(std::array::from_fn(|i| x[i]));
    let hi = exp8(std::array::from_fn(|i| x[8 + i]));
    std::array::from_fn(|i| if i < 8 { lo[i] } else { hi[i - 8] })
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub fn exp8(x: [f32; 8]) -> [f32; 8] {
    use safe_arch::*;
    let x = m256::from(x);
    // False for NaN too.
    let in_range = cmp_op_mask_m256::<{ cmp_op!(GreaterEqualOrdered) }>(x, set_splat_m256(LOWEST));
    let x = min_m256(max_m256(x, set_splat_m256(LOWEST)), set_splat_m256(HIGHEST));
    // n = round(x / ln 2), r = x - n ln 2.
    let n = floor_m256(fused_mul_add_m256(
        x,
        set_splat_m256(LOG2_E),
        set_splat_m256(0.5),
    ));
    let r = fused_mul_neg_add_m256(n, set_splat_m256(LN2_HI), x);
    let r = fused_mul_neg_add_m256(n, set_splat_m256(LN2_LO), r);
    let mut p = set_splat_m256(POLY[0]);
    for c in &POLY[1..] {
        p = fused_mul_add_m256(p, r, set_splat_m256(*c));
    }
    let p = fused_mul_add_m256(p, mul_m256(r, r), add_m256(r, set_splat_m256(1.0)));
    let scale = shl_imm_u32_m256i::<23>(add_i32_m256i(
        convert_to_i32_m256i_from_m256(n),
        set_splat_i32_m256i(127),
    ));
    let y = mul_m256(p, cast_to_m256_from_m256i(scale));
    // Lanes below the range (-inf, NaN) are exactly 0.
    <[f32; 8]>::from(blend_varying_m256(zeroed_m256(), y, in_range))
}

/// The same steps one lane at a time, for builds without AVX2.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
pub fn exp8(x: [f32; 8]) -> [f32; 8] {
    x.map(|x| {
        if !(x >= LOWEST) {
            return 0.0;
        }
        let x = x.min(HIGHEST);
        let n = x.mul_add(LOG2_E, 0.5).floor();
        let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
        let mut p = POLY[0];
        for c in &POLY[1..] {
            p = p.mul_add(r, *c);
        }
        let p = p.mul_add(r * r, r + 1.0);
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_libm_to_two_ulp_and_is_zero_below_its_range() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp8([x; 8]);
            let want = x.exp();
            for g in got {
                let ulp = (g.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
                worst = worst.max(ulp);
            }
            x += 0.000_731;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp8([0.0; 8]), [1.0; 8]);
        let low = exp8([
            -87.5,
            -100.0,
            -1e30,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
            1.0,
            -1.0,
        ]);
        assert_eq!(&low[..5], &[0.0; 5]);
        assert_eq!(low[5], 1.0);
        assert!((low[6] - std::f32::consts::E).abs() < 1e-6);
        assert!((low[7] - 1.0 / std::f32::consts::E).abs() < 1e-7);
        let sixteen: [f32; 16] = std::array::from_fn(|i| -(i as f32));
        let got = exp16(sixteen);
        for (i, g) in got.iter().enumerate() {
            assert!((g - (-(i as f32)).exp()).abs() <= 2e-7 * (-(i as f32)).exp().max(1e-30));
        }
    }
}
