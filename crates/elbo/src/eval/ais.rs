//! Annealed importance sampling (Neal 2001) with Hamiltonian Monte Carlo transitions.
//!
//! A chain starts at `z_0 ~ p_0`, a normalised density that can be sampled (the prior `p(z)` of
//! a decoder, a Gaussian fitted to the data for an energy), and moves through the geometric path
//!
//!   log π_t(z) = log p_0(z) + β_t r(z),   r(z) = log f(z) - log p_0(z),   0 = β_0 < ... < β_T = 1,
//!
//! between it and the unnormalised target `f` (Neal 2001, eq. 1). Its log-weight is
//! `log w = Σ_t (β_t - β_{t-1}) r(z_{t-1})` (Neal 2001, eq. 4), where `z_t` follows `z_{t-1}` by
//! an HMC transition that leaves `π_t` invariant (Neal 2011, section 5.3: `leapfrog` steps, then
//! a Metropolis test). `E[w] = Z = ∫ f`, so with `K` independent chains
//! `log Ẑ = log (1/K) Σ_k w_k` is a stochastic lower bound on `log Z` (Jensen) that is consistent
//! as `K` or `T` grows. Its standard error is the delta method over the chains,
//! `se(log Ẑ) ≈ sd(w) / (√K mean(w))`.
//!
//! Run backwards from an exact sample of the target (`β` from 1 to 0), the same machinery gives
//! weights with `E[w'] = 1/Z`, so `-log (1/K) Σ_k w'_k` is a stochastic upper bound on `log Z`:
//! the reverse AIS of bidirectional Monte Carlo (Grosse et al. 2015, section 4); exact target samples exist for
//! data simulated from the model (the latent that generated `x` is an exact posterior sample).
//!
//! `β_t` follows the sigmoid schedule of Grosse et al. (2015, section 6):
//! `β̃_t = σ(δ (2t/T - 1))`, `β_t = (β̃_t - β̃_0) / (β̃_T - β̃_0)`, `δ = 4`. The leapfrog step size
//! of each example is adapted after every transition toward an acceptance rate of 0.65 (as Wu
//! et al. 2017, section 3, adapt theirs), but from the acceptances of `adapt_chains` extra
//! pilot chains per example that run beside the others and are left out of the estimate: a
//! step size that depended on a chain's own past would make its transitions depend on its
//! state and bias the weights (measured on the linear-Gaussian test: about -0.05 nats), while
//! conditionally on the independent pilots every estimating chain is plain AIS.
//!
//! Entry points: [`log_marginal`], `log p(x)` per example for any [`LatentDecoder`], and
//! [`log_partition`], `log Z` of an unnormalised log-density started from a Gaussian.

use candle_core::{DType, Tensor, Var};

use crate::latent::LatentDecoder;
use crate::{Error, Result, Rng};

/// The settings of one AIS run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AisOptions {
    /// Independent chains per example (`K`).
    pub chains: usize,
    /// Intermediate distributions (`T`, transitions per chain).
    pub steps: usize,
    /// Leapfrog steps per HMC transition.
    pub leapfrog: usize,
    /// The initial leapfrog step size (adapted per example).
    pub step_size: f64,
    /// The acceptance rate the step size is adapted toward.
    pub target_accept: f64,
    /// Pilot chains per example whose acceptances adapt the step size (0: a fixed step size).
    pub adapt_chains: usize,
    /// Rows (examples x chains) annealed at once; examples are processed in chunks.
    pub max_rows: usize,
}

impl Default for AisOptions {
    fn default() -> Self {
        Self {
            chains: 16,
            steps: 500,
            leapfrog: 10,
            step_size: 0.2,
            target_accept: 0.65,
            adapt_chains: 4,
            max_rows: 4096,
        }
    }
}

impl AisOptions {
    /// The settings `[eval]` names (`ais_chains`, `ais_steps`, `ais_leapfrog`), the rest default.
    pub fn from_eval(e: &crate::config::EvalOptions) -> Self {
        Self {
            chains: e.ais_chains,
            steps: e.ais_steps,
            leapfrog: e.ais_leapfrog,
            ..Self::default()
        }
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "AIS (Neal 2001) with {} chains, {} sigmoid-spaced intermediate distributions and \
             HMC of {} leapfrog steps (step size adapted toward {} acceptance by {} pilot chains)",
            self.chains, self.steps, self.leapfrog, self.target_accept, self.adapt_chains
        )
    }

    /// Ranges: at least one chain, step and leapfrog step; a positive step size.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.chains == 0 || self.steps == 0 || self.leapfrog == 0 || self.max_rows == 0 {
            return bad(format!(
                "AIS needs at least one chain, intermediate distribution and leapfrog step \
                 (got chains = {}, steps = {}, leapfrog = {}); raise eval.ais_chains, \
                 eval.ais_steps or eval.ais_leapfrog",
                self.chains, self.steps, self.leapfrog
            ));
        }
        if !(self.step_size.is_finite() && self.step_size > 0.0) {
            return bad(format!(
                "the AIS step size must be positive, got {}",
                self.step_size
            ));
        }
        if !(self.target_accept > 0.0 && self.target_accept < 1.0) {
            return bad(format!(
                "the AIS target acceptance must be in (0, 1), got {}",
                self.target_accept
            ));
        }
        Ok(())
    }
}

/// One log-normaliser estimate per example (group of chains).
#[derive(Clone, Debug, PartialEq)]
pub struct AisEstimate {
    /// `log Ẑ` per example: the log-mean-exp of its chains' log-weights.
    pub log_z: Vec<f64>,
    /// Its delta-method standard error over the chains (NaN with one chain).
    pub stderr: Vec<f64>,
    /// The mean HMC acceptance rate over all transitions and chains.
    pub acceptance: f64,
}

/// The two ends of an annealing path over `z ∈ R^Z`, evaluated per row of `z: [R, Z]`. The
/// rows are chain-major: row `c * groups + g` is chain `c` of example `g`.
pub trait AnnealingPath {
    /// Dimensions of `z`.
    fn dim(&self) -> usize;
    /// `R` draws from the normalised start `p_0`, `[R, Z]`.
    fn sample_start(&self, rows: usize, rng: &mut Rng) -> Result<Tensor>;
    /// `log p_0(z)` per row, `[R]`, differentiable in `z`.
    fn log_start(&self, z: &Tensor) -> Result<Tensor>;
    /// `r(z) = log f(z) - log p_0(z)` per row, `[R]`, differentiable in `z`.
    fn log_ratio(&self, z: &Tensor) -> Result<Tensor>;
}

/// The sigmoid schedule `β_0 = 0 < ... < β_T = 1` (Grosse et al. 2015, section 6).
pub fn sigmoid_schedule(steps: usize) -> Vec<f64> {
    let delta = 4.0;
    let s = |t: usize| 1.0 / (1.0 + (-delta * (2.0 * t as f64 / steps as f64 - 1.0)).exp());
    let (lo, hi) = (s(0), s(steps));
    (0..=steps).map(|t| (s(t) - lo) / (hi - lo)).collect()
}

/// A value per row and its gradient in `z`, `([R], [R, Z])`.
fn value_and_grad(f: impl Fn(&Tensor) -> Result<Tensor>, z: &Tensor) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(&z.detach())?;
    let y = f(v.as_tensor())?; // [R]
    let grads = y.sum_all()?.backward()?;
    let g = grads
        .get(v.as_tensor())
        .cloned()
        .unwrap_or(v.as_tensor().zeros_like()?);
    Ok((y.detach(), g.detach()))
}

/// The state of every chain: position, `log p_0`, `r` and their gradients.
struct State {
    z: Tensor,
    ls: Tensor,
    r: Tensor,
    gs: Tensor,
    gr: Tensor,
}

impl State {
    fn at(path: &dyn AnnealingPath, z: Tensor) -> Result<Self> {
        let (ls, gs) = value_and_grad(|z| path.log_start(z), &z)?;
        let (r, gr) = value_and_grad(|z| path.log_ratio(z), &z)?;
        Ok(Self { z, ls, r, gs, gr })
    }

    /// `-log π_β` per row, `[R]`, and its gradient `[R, Z]`.
    fn potential(&self, beta: f64) -> Result<(Tensor, Tensor)> {
        let u = (self.ls.neg()? - (&self.r * beta)?)?;
        let g = (self.gs.neg()? - (&self.gr * beta)?)?;
        Ok((u, g))
    }
}

/// Row-wise choice: `a` where `mask` (`[R]`, 1 or 0) is 1, else `b`.
fn select(mask: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let m = if a.rank() == 2 {
        mask.unsqueeze(1)?.broadcast_as(a.shape())?
    } else {
        mask.clone()
    };
    Ok(m.where_cond(a, b)?)
}

/// One HMC transition leaving `π_β` invariant (Neal 2011, fig. 2), with per-row step sizes
/// `eps: [R, 1]`. Returns the new state and the per-row acceptance (1 or 0).
fn hmc(
    path: &dyn AnnealingPath,
    s: State,
    beta: f64,
    eps: &Tensor,
    leapfrog: usize,
    rng: &mut Rng,
) -> Result<(State, Vec<f32>)> {
    let (rows, zd) = s.z.dims2()?;
    let dev = s.z.device().clone();
    let p0 = rng.normal_tensor(&[rows, zd], &dev)?; // [R, Z]
    let (u0, g0) = s.potential(beta)?;
    let mut p = (&p0 - g0.broadcast_mul(eps)?.affine(0.5, 0.0)?)?;
    let mut z = s.z.clone();
    let mut cur = None;
    for l in 0..leapfrog {
        z = (&z + p.broadcast_mul(eps)?)?;
        let st = State::at(path, z.clone())?;
        let (_, g) = st.potential(beta)?;
        let scale = if l + 1 == leapfrog { 0.5 } else { 1.0 };
        p = (&p - g.broadcast_mul(eps)?.affine(scale, 0.0)?)?;
        cur = Some(st);
    }
    let new = cur.ok_or_else(|| Error::Config("HMC needs at least one leapfrog step".into()))?;
    let (u1, _) = new.potential(beta)?;
    let k0 = (p0.sqr()?.sum(1)? * 0.5)?;
    let k1 = (p.sqr()?.sum(1)? * 0.5)?;
    let log_accept: Vec<f32> = (((&u0 + &k0)? - &u1)? - &k1)?.to_vec1()?; // [R]
    let accept: Vec<f32> = log_accept
        .iter()
        .map(|a| {
            let u = rng.uniform().max(f64::MIN_POSITIVE).ln() as f32;
            if a.is_finite() && u < *a {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(accept.clone(), rows, &dev)?.ne(0f32)?; // [R]
    let out = State {
        z: select(&mask, &new.z, &s.z)?,
        ls: select(&mask, &new.ls, &s.ls)?,
        r: select(&mask, &new.r, &s.r)?,
        gs: select(&mask, &new.gs, &s.gs)?,
        gr: select(&mask, &new.gr, &s.gr)?,
    };
    Ok((out, accept))
}

/// Anneal the rows `z0: [groups * chains, Z]` along `betas` (increasing: forward AIS from
/// `p_0`; decreasing: reverse AIS from the target) and return each row's
/// `Σ_t (β_t - β_{t-1}) r(z_{t-1})` with the mean acceptance of the estimating chains. The last
/// `opts.adapt_chains` chains of each example are pilots: their acceptances set its step size
/// and their weights are not to be used.
pub fn anneal(
    path: &dyn AnnealingPath,
    z0: Tensor,
    groups: usize,
    betas: &[f64],
    opts: &AisOptions,
    rng: &mut Rng,
) -> Result<(Vec<f64>, f64)> {
    opts.validate()?;
    let rows = z0.dim(0)?;
    if groups == 0 || rows % groups != 0 {
        return Err(Error::Shape(format!(
            "AIS: {rows} rows are not whole chains of {groups} examples"
        )));
    }
    let chains = rows / groups;
    let pilots = opts.adapt_chains;
    if pilots >= chains {
        return Err(Error::Config(format!(
            "AIS: {chains} chains per example leave none beside the {pilots} pilot chains"
        )));
    }
    let dev = z0.device().clone();
    let mut s = State::at(path, z0.to_dtype(DType::F32)?)?;
    let mut logw = vec![0f64; rows];
    let mut eps = vec![opts.step_size; groups];
    let (mut acc_sum, mut acc_n) = (0f64, 0usize);
    for t in 1..betas.len() {
        let db = betas[t] - betas[t - 1];
        let r: Vec<f32> = s.r.to_vec1()?;
        for (w, v) in logw.iter_mut().zip(&r) {
            *w += db * f64::from(*v);
        }
        if t + 1 == betas.len() {
            break; // the last transition does not change the weights
        }
        let eps_rows: Vec<f32> = (0..rows).map(|i| eps[i % groups] as f32).collect();
        let eps_t = Tensor::from_vec(eps_rows, (rows, 1), &dev)?; // [R, 1]
        let (next, accept) = hmc(path, s, betas[t], &eps_t, opts.leapfrog, rng)?;
        s = next;
        if pilots > 0 {
            for (g, e) in eps.iter_mut().enumerate() {
                let rate = (chains - pilots..chains)
                    .map(|c| f64::from(accept[c * groups + g]))
                    .sum::<f64>()
                    / pilots as f64;
                *e = (*e
                    * if rate > opts.target_accept {
                        1.05
                    } else {
                        0.95
                    })
                .clamp(1e-4, 2.0);
            }
        }
        let used = (chains - pilots) * groups;
        acc_sum += accept[..used].iter().map(|a| f64::from(*a)).sum::<f64>();
        acc_n += used;
    }
    let acceptance = if acc_n == 0 {
        f64::NAN
    } else {
        acc_sum / acc_n as f64
    };
    Ok((logw, acceptance))
}

/// `(log mean_k e^{w_k}, delta-method s.e.)` of one example's chain log-weights.
pub fn log_mean_exp_se(w: &[f64]) -> (f64, f64) {
    let m = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return (m, f64::NAN);
    }
    let e: Vec<f64> = w.iter().map(|v| (v - m).exp()).collect();
    let k = e.len() as f64;
    let mean = e.iter().sum::<f64>() / k;
    let se = if e.len() < 2 {
        f64::NAN
    } else {
        let var = e.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (k - 1.0);
        var.sqrt() / (k.sqrt() * mean)
    };
    (m + mean.ln(), se)
}

/// Forward AIS over `groups` examples of a path: `log Ẑ` per example with its s.e.
pub fn estimate(
    path: &dyn AnnealingPath,
    groups: usize,
    opts: &AisOptions,
    rng: &mut Rng,
) -> Result<AisEstimate> {
    let k = opts.chains;
    let z0 = path.sample_start(groups * (k + opts.adapt_chains), rng)?;
    let (logw, acceptance) = anneal(path, z0, groups, &sigmoid_schedule(opts.steps), opts, rng)?;
    let (log_z, stderr) = (0..groups)
        .map(|g| {
            let w: Vec<f64> = (0..k).map(|c| logw[c * groups + g]).collect();
            log_mean_exp_se(&w)
        })
        .unzip();
    Ok(AisEstimate {
        log_z,
        stderr,
        acceptance,
    })
}

/// The annealing path from a decoder's prior to its posterior given `x`: `p_0 = p(z)`,
/// `r(z) = log p(x | z)`, so `Z = p(x)`.
pub struct PosteriorPath<'a> {
    decoder: &'a dyn LatentDecoder,
    /// `x` repeated once per chain, chain-major, `[K * N, D]`.
    x: Tensor,
}

impl<'a> PosteriorPath<'a> {
    /// The path for the examples `x: [N, D]` with `chains` chains each.
    pub fn new(decoder: &'a dyn LatentDecoder, x: &Tensor, chains: usize) -> Result<Self> {
        let (n, d) = x.dims2()?;
        let x = x
            .unsqueeze(0)?
            .broadcast_as((chains, n, d))?
            .reshape((chains * n, d))?; // [K*N, D]
        Ok(Self { decoder, x })
    }
}

impl AnnealingPath for PosteriorPath<'_> {
    fn dim(&self) -> usize {
        self.decoder.latent_dim()
    }
    fn sample_start(&self, rows: usize, rng: &mut Rng) -> Result<Tensor> {
        self.decoder.sample_prior(rows, self.x.device(), rng)
    }
    fn log_start(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.log_prior(z)
    }
    fn log_ratio(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.log_likelihood_given(z, &self.x)
    }
}

/// AIS estimates of `log p(x)` for each row of `x: [N, D]` under a latent-variable decoder,
/// annealing from the prior to the posterior (Wu et al. 2017, section 3), at most
/// `opts.max_rows` chains at a time.
pub fn log_marginal(
    decoder: &dyn LatentDecoder,
    x: &Tensor,
    opts: &AisOptions,
    rng: &mut Rng,
) -> Result<AisEstimate> {
    opts.validate()?;
    let n = x.dim(0)?;
    let per = (opts.max_rows / (opts.chains + opts.adapt_chains)).max(1);
    let mut out = AisEstimate {
        log_z: Vec::with_capacity(n),
        stderr: Vec::with_capacity(n),
        acceptance: 0.0,
    };
    let mut start = 0;
    while start < n {
        let len = per.min(n - start);
        let rows = opts.chains + opts.adapt_chains;
        let path = PosteriorPath::new(decoder, &x.narrow(0, start, len)?, rows)?;
        let e = estimate(&path, len, opts, rng)?;
        out.log_z.extend(e.log_z);
        out.stderr.extend(e.stderr);
        out.acceptance += e.acceptance * len as f64 / n as f64;
        start += len;
    }
    Ok(out)
}

/// A path from a diagonal Gaussian `N(μ, diag σ²)` to an unnormalised log-density.
pub struct GaussianStartPath<'a> {
    log_density: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    mean: Tensor,
    log_std: Tensor,
}

impl<'a> GaussianStartPath<'a> {
    /// The path from `N(mean, diag std²)` (`[Z]` each) to `log_density` (`[R, Z] -> [R]`).
    pub fn new(
        log_density: &'a dyn Fn(&Tensor) -> Result<Tensor>,
        mean: &Tensor,
        std: &Tensor,
    ) -> Result<Self> {
        Ok(Self {
            log_density,
            mean: mean.to_dtype(DType::F32)?.detach(),
            log_std: std.to_dtype(DType::F32)?.log()?.detach(),
        })
    }
}

impl AnnealingPath for GaussianStartPath<'_> {
    fn dim(&self) -> usize {
        self.mean.elem_count()
    }
    fn sample_start(&self, rows: usize, rng: &mut Rng) -> Result<Tensor> {
        let eps = rng.normal_tensor(&[rows, self.dim()], self.mean.device())?;
        Ok(eps
            .broadcast_mul(&self.log_std.exp()?)?
            .broadcast_add(&self.mean)?)
    }
    fn log_start(&self, z: &Tensor) -> Result<Tensor> {
        let rows = z.dim(0)?;
        let mu = self.mean.unsqueeze(0)?.broadcast_as((rows, self.dim()))?;
        let lv = (self.log_std.unsqueeze(0)? * 2.0)?.broadcast_as((rows, self.dim()))?;
        crate::latent::diag_normal_log_density(z, &mu, &lv)
    }
    fn log_ratio(&self, z: &Tensor) -> Result<Tensor> {
        Ok(((self.log_density)(z)? - self.log_start(z)?)?)
    }
}

/// AIS estimate of `log Z = log ∫ exp(log_density(z)) dz` from `N(mean, diag std²)`, with
/// `opts.chains` chains: `(log Ẑ, s.e., acceptance)`.
pub fn log_partition(
    log_density: &dyn Fn(&Tensor) -> Result<Tensor>,
    mean: &Tensor,
    std: &Tensor,
    opts: &AisOptions,
    rng: &mut Rng,
) -> Result<(f64, f64, f64)> {
    let path = GaussianStartPath::new(log_density, mean, std)?;
    let e = estimate(&path, 1, opts, rng)?;
    Ok((e.log_z[0], e.stderr[0], e.acceptance))
}

/// Reverse AIS from exact target samples `z_exact: [K * N, Z]` (chain-major over `N`
/// examples; the last `opts.adapt_chains` of the `K` are the pilots): `-log mean_k w'_k` over
/// the others per example, a stochastic upper bound on `log Z` (Grosse et al. 2015, section 4).
pub fn reverse_upper_bound(
    path: &dyn AnnealingPath,
    z_exact: Tensor,
    groups: usize,
    opts: &AisOptions,
    rng: &mut Rng,
) -> Result<Vec<f64>> {
    let mut betas = sigmoid_schedule(opts.steps);
    betas.reverse();
    let rows = z_exact.dim(0)?;
    let (logw, _) = anneal(path, z_exact, groups, &betas, opts, rng)?;
    let k = rows / groups - opts.adapt_chains;
    Ok((0..groups)
        .map(|g| {
            let w: Vec<f64> = (0..k).map(|c| logw[c * groups + g]).collect();
            -log_mean_exp_se(&w).0
        })
        .collect())
}
