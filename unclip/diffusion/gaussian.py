"""The Gaussian diffusion process (Ho et al. 2020): forward noising, posteriors and one reverse step.

Pure tensor math; networks appear only as their outputs. The network may predict the noise
("eps"), the clean sample ("x0") or the velocity ("v", Salimans & Ho 2022).

Schedule buffers are float64 on the CPU. Per-timestep coefficients are gathered and combined in
float64 and only then cast to the sample's dtype and device, so half-precision sampling does not
lose precision in the coefficients themselves. A process may instead compute its buffers in
float32 (`arithmetic`), as diffusers' UnCLIPScheduler does: weights sampled with that scheduler
(Karlo) then get its exact coefficients, since untrained or chaotic networks amplify even a
1e-4 difference in one step.
"""

import torch
from torch import Tensor

PARAMETERIZATIONS = ("eps", "x0", "v")
# The reverse step's variance: the posterior's ("fixed_small"), or interpolated in log space
# between it and beta_t by a second half of the network's output channels ("learned_range",
# Nichol & Dhariwal 2021; Karlo's decoder).
VARIANCES = ("fixed_small", "learned_range")
ARITHMETICS = {"float64": torch.float64, "float32": torch.float32}


class GaussianDiffusion:
    """A diffusion process given by its betas.

    When the process is a respaced subsequence of a longer one, `timestep_map[i]` is the original
    timestep of step i; networks are always called with original timesteps (`model_timesteps`).
    """

    def __init__(
        self,
        betas: Tensor,
        parameterization: str = "eps",
        timestep_map: Tensor | None = None,
        variance: str = "fixed_small",
        arithmetic: str = "float64",
        alphas_cumprod: Tensor | None = None,
    ):
        """`alphas_cumprod`, when given, are taken as they are rather than recomputed from the
        betas (respacing keeps the base process's products exactly)."""
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {tuple(ARITHMETICS)}, got {arithmetic!r}")
        dtype = ARITHMETICS[arithmetic]
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu().to(dtype)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        # A respaced step may jump straight from pure noise: in float32 its beta rounds to 1.
        below_one = betas < 1 if alphas_cumprod is None else betas <= 1
        if not ((betas > 0) & below_one).all():
            raise ValueError("betas must lie in the open interval (0, 1)")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        num_timesteps = betas.numel()
        if timestep_map is None:
            timestep_map = torch.arange(num_timesteps)
        timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        if timestep_map.shape != (num_timesteps,):
            raise ValueError(f"timestep_map must have shape ({num_timesteps},), got {tuple(timestep_map.shape)}")

        self.num_timesteps = num_timesteps
        self.parameterization = parameterization
        self.variance = variance
        self.arithmetic = arithmetic
        self.timestep_map = timestep_map

        # Computed in `dtype` in UnCLIPScheduler's order of operations, then held as float64.
        alphas = 1.0 - betas
        if alphas_cumprod is None:
            acp = torch.cumprod(alphas, dim=0)
        else:
            acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu().to(dtype)
            if acp.shape != betas.shape:
                raise ValueError(f"alphas_cumprod must have shape {tuple(betas.shape)}, got {tuple(acp.shape)}")
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        one_minus_acp = 1.0 - acp
        # q(x_{t-1} | x_t, x_0) is Gaussian: Bayes' rule combining q(x_t | x_{t-1}) with q(x_{t-1} | x_0).
        posterior_variance = (1.0 - acp_prev) / one_minus_acp * betas
        self.betas = betas.double()
        self.log_betas = betas.log().double()
        self.alphas_cumprod = acp.double()
        self.alphas_cumprod_prev = acp_prev.double()
        self.sqrt_alphas_cumprod = acp.sqrt().double()
        self.sqrt_one_minus_alphas_cumprod = one_minus_acp.sqrt().double()
        self.sqrt_recip_alphas_cumprod = acp.rsqrt().double()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt().double()
        self.posterior_variance = posterior_variance.double()
        self.posterior_log_variance_clipped = _log_with_finite_start(posterior_variance).double()
        self.posterior_mean_coef_x0 = (acp_prev.sqrt() * betas / one_minus_acp).double()
        self.posterior_mean_coef_xt = (alphas.sqrt() * (1.0 - acp_prev) / one_minus_acp).double()

    # -- forward process ------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(acp_t) x_0, (1 - acp_t) I) using the given standard noise."""
        signal_scale, noise_scale = self._scales(t, x0)
        return signal_scale * x0 + noise_scale * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and (clipped) log-variance of q(x_{t-1} | x_t, x_0); the latter two broadcast to x_t."""
        mean = self.q_posterior_mean(x0, x_t, t)
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The mean of q(x_{t-1} | x_t, x_0)."""
        coef_x0 = _extract(self.posterior_mean_coef_x0, t, x_t)
        coef_xt = _extract(self.posterior_mean_coef_xt, t, x_t)
        return coef_x0 * x0 + coef_xt * x_t

    # -- conversions between parameterizations, all from x_t = sqrt(acp) x_0 + sqrt(1 - acp) eps --

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        if self.arithmetic == "float32":  # UnCLIPScheduler's form, rounding as it rounds
            signal_scale, noise_scale = self._scales(t, x_t)
            return (x_t - noise_scale * eps) / signal_scale
        recip, recipm1 = self._reciprocal_scales(t, x_t)
        return recip * x_t - recipm1 * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        recip, recipm1 = self._reciprocal_scales(t, x_t)
        return (recip * x_t - x0) / recipm1

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        signal_scale, noise_scale = self._scales(t, x_t)
        return signal_scale * x_t - noise_scale * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        signal_scale, noise_scale = self._scales(t, x_t)
        return noise_scale * x_t + signal_scale * v

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(acp) eps - sqrt(1 - acp) x_0, i.e. d x_t / d phi for x_t = cos(phi) x_0 + sin(phi) eps."""
        signal_scale, noise_scale = self._scales(t, x0)
        return signal_scale * noise - noise_scale * x0

    def _scales(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(acp_t), sqrt(1 - acp_t)), broadcastable to x."""
        return _extract(self.sqrt_alphas_cumprod, t, x), _extract(self.sqrt_one_minus_alphas_cumprod, t, x)

    def _reciprocal_scales(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(1 / sqrt(acp_t), sqrt(1 / acp_t - 1)), broadcastable to x."""
        return _extract(self.sqrt_recip_alphas_cumprod, t, x), _extract(self.sqrt_recipm1_alphas_cumprod, t, x)

    @property
    def learned_variance(self) -> bool:
        """Whether the network also outputs the step's variance (as many channels again)."""
        return self.variance == "learned_range"

    def split_variance(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the prediction in this process's parameterization, the variance output or None)."""
        if not self.learned_variance:
            return model_output, None
        if model_output.ndim < 2 or model_output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(
                f"a learned-variance output needs twice x_t's {x_t.shape[1]} channels, got shape {tuple(model_output.shape)}"
            )
        prediction, variance = model_output.chunk(2, dim=1)
        return prediction, variance

    def learned_log_variance(self, variance_output: Tensor, t: Tensor) -> Tensor:
        """log sigma_t^2 from a network's variance output v in [-1, 1]: v = -1 is the posterior's
        variance, v = 1 is beta_t, in between interpolated in log space."""
        fraction = (variance_output + 1) / 2
        min_log = _extract(self.posterior_log_variance_clipped, t, variance_output)
        max_log = _extract(self.log_betas, t, variance_output)
        return fraction * max_log + (1 - fraction) * min_log

    def split_model_output(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted x_0, predicted eps) from a network output in this process's parameterization
        (a learned variance half, if the output still has it, is dropped: `split_variance`)."""
        if self.learned_variance and model_output.ndim > 1 and model_output.shape[1] == 2 * x_t.shape[1]:
            model_output, _ = self.split_variance(model_output, x_t)
        x0 = self.predict_x0(model_output, x_t, t)
        if self.parameterization == "eps":
            return x0, model_output
        if self.parameterization == "x0":
            return x0, self.predict_eps_from_x0(x_t, t, model_output)
        return x0, self.predict_eps_from_v(x_t, t, model_output)

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted x_0 alone from a network output in this process's parameterization (without
        a learned variance half): what a DDPM step needs."""
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != x_t shape {tuple(x_t.shape)}")
        if self.parameterization == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output)
        if self.parameterization == "x0":
            return model_output
        return self.predict_x0_from_v(x_t, t, model_output)

    # -- training -------------------------------------------------------------------------------

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        return self.v_target(x0, noise, t)

    def training_losses(self, model_output: Tensor, x0: Tensor, noise: Tensor, t: Tensor, min_snr_gamma: float = 0.0) -> Tensor:
        """Per-example mean squared error against the training target, shape [B].

        min_snr_gamma > 0 applies Min-SNR-gamma weighting (Hang et al. 2023): each timestep's
        loss is weighted as an x0 loss clipped at SNR = gamma. The nearly clean timesteps, which
        only refine detail, then stop dominating the gradient, and training converges faster.
        """
        squared_error = (model_output - self.training_target(x0, noise, t)).square()
        losses = squared_error.reshape(squared_error.shape[0], -1).mean(dim=1)
        if min_snr_gamma > 0:
            losses = losses * self.min_snr_weights(t, min_snr_gamma).to(losses)
        return losses

    def min_snr_weights(self, t: Tensor, gamma: float) -> Tensor:
        """min(SNR, gamma) expressed in the units of this process's training target."""
        acp = self.alphas_cumprod[t.cpu()]
        snr = acp / (1.0 - acp)
        # An eps error is an x0 error divided by SNR, a v error an x0 error divided by SNR + 1.
        if self.parameterization == "eps":
            return (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, and 1 where SNR is 0
        if self.parameterization == "v":
            return snr.clamp(max=gamma) / (snr + 1.0)
        return snr.clamp(max=gamma)

    # -- sampling -------------------------------------------------------------------------------

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original timesteps of (possibly respaced) step indices t, for calling the network."""
        return self.timestep_map.to(t.device)[t]

    def ddpm_step(
        self, x0_pred: Tensor, x_t: Tensor, t: Tensor, noise: Tensor | None = None, log_variance: Tensor | None = None
    ) -> Tensor:
        """Sample x_{t-1} from the posterior q(x_{t-1} | x_t, x0_pred), with its fixed variance or
        a learned `log_variance` (broadcastable to x_t: `learned_log_variance`).

        Rows with t == 0 get the posterior mean (the final sample, x0_pred); noise may be None only
        when every t is 0.
        """
        mean = self.q_posterior_mean(x0_pred, x_t, t)
        t_cpu = t.cpu()
        if log_variance is None:
            std = torch.where(t_cpu > 0, (0.5 * self.posterior_log_variance_clipped[t_cpu]).exp(), 0.0)
            return _add_noise(mean, std, t, noise)
        if noise is None:
            return _add_noise(mean, torch.zeros(len(t_cpu), dtype=torch.float64), t, None)
        keep = _broadcast((t_cpu > 0).to(torch.float64), mean)
        return mean + keep * (0.5 * log_variance).exp().to(mean.dtype) * noise

    def ddim_step(
        self, x0_pred: Tensor, eps_pred: Tensor, x_t: Tensor, t: Tensor, eta: float, noise: Tensor | None = None
    ) -> Tensor:
        """The DDIM update (Song et al. 2021, eq. 12) from step t to the previous step of this process.

        x_{t-1} keeps the marginal q(x_{t-1} | x_0): sqrt(acp_prev) x0_pred plus noise of total
        variance 1 - acp_prev, split between the predicted eps (deterministic) and fresh noise of
        std sigma. sigma = eta * (the DDPM posterior std), so eta = 0 is deterministic (noise is
        ignored) and eta = 1 matches DDPM's variance.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t_cpu = t.cpu()
        acp = self.alphas_cumprod[t_cpu]
        acp_prev = self.alphas_cumprod_prev[t_cpu]
        sigma = eta * ((1.0 - acp_prev) / (1.0 - acp) * (1.0 - acp / acp_prev)).sqrt()
        eps_coef = (1.0 - acp_prev - sigma.square()).clamp(min=0.0).sqrt()
        mean = _broadcast(acp_prev.sqrt(), x_t) * x0_pred + _broadcast(eps_coef, x_t) * eps_pred
        if eta == 0:
            return mean
        return _add_noise(mean, sigma, t, noise)


def _log_with_finite_start(posterior_variance: Tensor) -> Tensor:
    # The posterior variance is exactly 0 at t = 0 (x_0 is then given); borrow t = 1's value so
    # the log stays finite. No noise is ever added at t = 0, so the substitute is never used.
    log_variance = posterior_variance.log()
    if posterior_variance.numel() > 1:
        log_variance[0] = log_variance[1]
    return log_variance


def _broadcast(values: Tensor, x: Tensor) -> Tensor:
    """Per-row values [B] (or [1]) as x's dtype and device, shaped to broadcast against x."""
    return values.to(x.dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _extract(buffer: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """buffer[t] for each row, broadcastable to x."""
    return _broadcast(buffer[t.cpu()], x)


def _add_noise(mean: Tensor, std: Tensor, t: Tensor, noise: Tensor | None) -> Tensor:
    """mean + std * noise, where std (float64, per row) is 0 wherever t == 0."""
    if noise is None:
        if (t != 0).any():
            raise ValueError("noise is required for a stochastic step with t > 0")
        return mean
    return mean + _broadcast(std, mean) * noise
