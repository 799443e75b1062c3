//! NumPy's random generators, so seeded choices pick the same rows as in Python:
//! `np.random.default_rng(seed)` (SeedSequence feeding PCG64), which `datasets`' seeded
//! `train_test_split` uses, and the legacy global `np.random.seed(seed)` (MT19937), which
//! `num_samples` draws from after transformers' `set_seed`.

/// The raw draws of a NumPy bit generator and the integer sampling NumPy builds on them.
pub trait BitGenerator {
    fn next_u64(&mut self) -> u64;
    fn next_u32(&mut self) -> u32;

    /// A uniform integer in `0..=max` by masked rejection, as NumPy's `random_interval` and
    /// its masked bounded integers.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let value = if max <= u64::from(u32::MAX) {
                u64::from(self.next_u32()) & mask
            } else {
                self.next_u64() & mask
            };
            if value <= max {
                return value;
            }
        }
    }

    /// `permutation(n)`: a Fisher-Yates shuffle of `0..n` from the last position down.
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            order.swap(i, j);
        }
        order
    }

    /// `choice(n, k)` with replacement: `k` uniform integers in `0..n` (`n` > 0).
    fn choice(&mut self, n: usize, k: usize) -> Vec<usize> {
        (0..k)
            .map(|_| self.interval(n as u64 - 1) as usize)
            .collect()
    }
}

/// NumPy's `SeedSequence` for an integer entropy with no spawn key.
struct SeedSequence {
    pool: [u32; 4],
}

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

impl SeedSequence {
    fn new(seed: u64) -> Self {
        // The integer is split into 32-bit words, least significant first (at least one word).
        let entropy: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut hash_const = INIT_A;
        let mut hashmix = |value: u32| {
            let mut value = value ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_A);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        };
        let mix = |x: u32, y: u32| {
            let result = MIX_MULT_L
                .wrapping_mul(x)
                .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
            result ^ (result >> XSHIFT)
        };
        let mut pool = [0u32; 4];
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(entropy.get(i).copied().unwrap_or(0));
        }
        for src in 0..pool.len() {
            for dst in 0..pool.len() {
                if src != dst {
                    pool[dst] = mix(pool[dst], hashmix(pool[src]));
                }
            }
        }
        Self { pool }
    }

    /// `generate_state(n, np.uint64)`: 2n 32-bit words paired little-endian.
    fn generate_state_u64(&self, n: usize) -> Vec<u64> {
        let mut hash_const = INIT_B;
        let words: Vec<u32> = (0..2 * n)
            .map(|i| {
                let mut value = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                value = value.wrapping_mul(hash_const);
                value ^ (value >> XSHIFT)
            })
            .collect();
        words
            .chunks(2)
            .map(|pair| u64::from(pair[0]) | (u64::from(pair[1]) << 32))
            .collect()
    }
}

const PCG_MULTIPLIER: u128 = (2549297995355413924u128 << 64) | 4865540595714422341u128;

/// PCG64 (XSL-RR 128/64) with NumPy's buffered 32-bit draws.
pub struct Pcg64 {
    state: u128,
    increment: u128,
    buffered: Option<u32>,
}

impl Pcg64 {
    /// `np.random.default_rng(seed)`'s bit generator.
    pub fn from_seed(seed: u64) -> Self {
        let words = SeedSequence::new(seed).generate_state_u64(4);
        let initstate = (u128::from(words[0]) << 64) | u128::from(words[1]);
        let initseq = (u128::from(words[2]) << 64) | u128::from(words[3]);
        let mut rng = Self {
            state: 0,
            increment: (initseq << 1) | 1,
            buffered: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self
            .state
            .wrapping_mul(PCG_MULTIPLIER)
            .wrapping_add(self.increment);
    }
}

impl BitGenerator for Pcg64 {
    fn next_u64(&mut self) -> u64 {
        self.step();
        let rotation = (self.state >> 122) as u32;
        (((self.state >> 64) as u64) ^ (self.state as u64)).rotate_right(rotation)
    }

    /// The low half of a 64-bit draw, then its high half on the next call.
    fn next_u32(&mut self) -> u32 {
        if let Some(high) = self.buffered.take() {
            return high;
        }
        let next = self.next_u64();
        self.buffered = Some((next >> 32) as u32);
        next as u32
    }
}

const MT_N: usize = 624;
const MT_M: usize = 397;

/// MT19937 as NumPy's legacy `RandomState` seeds and draws it.
pub struct Mt19937 {
    key: [u32; MT_N],
    pos: usize,
}

impl Mt19937 {
    /// `np.random.seed(seed)` for a seed below 2^32.
    pub fn from_seed(seed: u32) -> Self {
        let mut key = [0u32; MT_N];
        key[0] = seed;
        for i in 1..MT_N {
            let prev = key[i - 1];
            key[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { key, pos: MT_N }
    }

    fn regenerate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.key[i] & UPPER) | (self.key[(i + 1) % MT_N] & LOWER);
            let twisted = (y >> 1) ^ if y & 1 == 1 { MATRIX_A } else { 0 };
            self.key[i] = self.key[(i + MT_M) % MT_N] ^ twisted;
        }
        self.pos = 0;
    }
}

impl BitGenerator for Mt19937 {
    fn next_u32(&mut self) -> u32 {
        if self.pos == MT_N {
            self.regenerate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn next_u64(&mut self) -> u64 {
        (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by NumPy 2.4: np.random.default_rng(seed).permutation(n) and
    // np.random.default_rng(seed).bit_generator.random_raw().
    // np.random.seed(seed) followed by np.random.permutation / np.random.choice, NumPy 2.4.
    #[test]
    fn matches_numpy_legacy_global_generator() {
        let mut rng = Mt19937::from_seed(42);
        assert_eq!(rng.permutation(10), vec![8, 1, 5, 0, 7, 2, 9, 4, 3, 6]);
        assert_eq!(rng.choice(7, 5), vec![2, 6, 2, 2, 4]);
        assert_eq!(Mt19937::from_seed(0).permutation(5), vec![2, 0, 1, 3, 4]);
        assert_eq!(
            Mt19937::from_seed(1234).permutation(1000)[..5],
            [681, 990, 155, 768, 438]
        );
    }

    #[test]
    fn matches_numpy_default_rng() {
        assert_eq!(
            Pcg64::from_seed(42).permutation(10),
            vec![5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
        );
        assert_eq!(Pcg64::from_seed(0).next_u64(), 11749869230777074271);
        assert_eq!(
            Pcg64::from_seed(1234).permutation(12),
            vec![0, 9, 11, 5, 6, 2, 8, 4, 7, 1, 3, 10]
        );
        assert_eq!(
            Pcg64::from_seed(1 << 40).permutation(6),
            vec![0, 5, 3, 4, 2, 1]
        );
        assert_eq!(
            Pcg64::from_seed(7).permutation(100_000)[..5],
            [45070, 71435, 99538, 45453, 95412]
        );
    }
}
