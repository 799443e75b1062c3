//! Learning-rate schedules with the formulas of transformers' `get_scheduler`: the multiplier of
//! optimizer step `k` (0-based) is `lambda(k)`, so with warmup the first step runs at lr 0.

use std::f64::consts::PI;

#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts { cycles: u32 },
    CosineWithMinLr { min_lr_rate: f64 },
    Polynomial { lr_end: f64, power: f64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

/// `warmup_steps` when positive, else `ceil(warmup_ratio × total_steps)`, as transformers does.
pub fn warmup_steps(warmup_steps: u64, warmup_ratio: f64, total_steps: u64) -> u64 {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total_steps as f64).ceil() as u64
    }
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    fn multiplier(&self, step: u64) -> f64 {
        let (s, w, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming = step < self.warmup_steps;
        let warm = s / w.max(1.0);
        let progress = (s - w) / (total - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup if warming => warm,
            ScheduleKind::ConstantWithWarmup => 1.0,
            _ if warming => warm,
            ScheduleKind::Linear => ((total - s) / (total - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
            ScheduleKind::CosineWithRestarts { cycles } => {
                if progress >= 1.0 {
                    0.0
                } else {
                    let phase = (cycles as f64 * progress) % 1.0;
                    (0.5 * (1.0 + (PI * phase).cos())).max(0.0)
                }
            }
            ScheduleKind::CosineWithMinLr { min_lr_rate } => {
                let factor = 0.5 * (1.0 + (PI * progress).cos());
                factor * (1.0 - min_lr_rate) + min_lr_rate
            }
            ScheduleKind::Polynomial { lr_end, power } => {
                if step > self.total_steps {
                    lr_end / self.base_lr
                } else {
                    let range = self.base_lr - lr_end;
                    let remaining = 1.0 - (s - w) / (total - w);
                    (range * remaining.powf(power) + lr_end) / self.base_lr
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> Schedule {
        Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    // Expected values computed by hand from transformers' lambda definitions.
    #[test]
    fn linear_with_warmup() {
        let s = sched(ScheduleKind::Linear, 2, 10);
        close(s.lr(0), 0.0);
        close(s.lr(1), 0.5);
        close(s.lr(2), 1.0);
        close(s.lr(6), 0.5);
        close(s.lr(10), 0.0);
    }

    #[test]
    fn cosine_family() {
        let s = sched(ScheduleKind::Cosine, 0, 10);
        close(s.lr(0), 1.0);
        close(s.lr(5), 0.5);
        close(s.lr(10), 0.0);
        let r = sched(ScheduleKind::CosineWithRestarts { cycles: 2 }, 0, 10);
        close(r.lr(5), 1.0);
        close(r.lr(10), 0.0);
        let m = sched(ScheduleKind::CosineWithMinLr { min_lr_rate: 0.1 }, 0, 10);
        close(m.lr(10), 0.1);
        close(m.lr(5), 0.55);
    }

    #[test]
    fn constant_kinds_and_polynomial() {
        close(sched(ScheduleKind::Constant, 3, 10).lr(0), 1.0);
        let w = sched(ScheduleKind::ConstantWithWarmup, 4, 10);
        close(w.lr(1), 0.25);
        close(w.lr(9), 1.0);
        let p = sched(
            ScheduleKind::Polynomial {
                lr_end: 1e-7,
                power: 1.0,
            },
            0,
            10,
        );
        close(p.lr(5), (1.0 - 1e-7) * 0.5 + 1e-7);
        close(p.lr(11), 1e-7);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(warmup_steps(0, 0.1, 15), 2);
        assert_eq!(warmup_steps(3, 0.1, 15), 3);
        assert_eq!(warmup_steps(0, 0.0, 15), 0);
    }
}
