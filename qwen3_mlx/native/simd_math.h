// Vector math shared by the SIMD bodies (quantized_simd.h, prefill_attention_simd.h), written over
// a traits type S with max, set1, round, mul, fma, add and pow2 (2^k for whole k). Included
// inside each ISA file's unnamed namespace, like those bodies.

// e^x for x <= 0 (a score minus its row's max): Cephes' expf (a Cody-Waite split of x ln 2 and a
// degree-6 polynomial), within 2 ulp of e^x. Below -87.3 (e^x < 1.2e-38) it is clamped there, so
// 2^k stays a normal float.
template <class S>
typename S::V exponential(typename S::V x) {
  using V = typename S::V;
  x = S::max(x, S::set1(-87.3f));
  const V k = S::round(S::mul(x, S::set1(1.44269504088896341f)));
  V r = S::fma(k, S::set1(-0.693359375f), x);
  r = S::fma(k, S::set1(2.12194440e-4f), r);
  V y = S::set1(1.9875691500e-4f);
  y = S::fma(y, r, S::set1(1.3981999507e-3f));
  y = S::fma(y, r, S::set1(8.3334519073e-3f));
  y = S::fma(y, r, S::set1(4.1665795894e-2f));
  y = S::fma(y, r, S::set1(1.6666665459e-1f));
  y = S::fma(y, r, S::set1(5.0000001201e-1f));
  y = S::fma(y, S::mul(r, r), S::add(r, S::set1(1.0f)));
  return S::mul(y, S::pow2(k));
}

