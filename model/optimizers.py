"""The references' optimizers on the Keras 3 Optimizer API: TensorFlow 1's update rules.

Both references train with `tf.compat.v1.train` optimizers. Keras 3's SGD computes TF1's
MomentumOptimizer update. Keras' Adam computes TF1's formula but takes its β's through float32
(a float64 step parts from the definition by 7e-6), and its ε is 1e-7 where TF1's is 1e-8:
`TF1Adam` computes the definition in the variable's dtype, with TF1's ε. Keras' RMSprop differs
more: TF1's RMSPropOptimizer starts its mean-square slot at 1, so its first steps are about lr·g
rather than lr·sign(g), and its ε is 1e-10; `TF1RMSProp` computes TF1's rule. Every optimizer
here works on either backend (TensorFlow, JAX).
"""
import keras
from keras import ops

# What the saved run settings call these rules (runtime/run_record.py); a model_dir trained before
# the tool followed them (on Keras' own RMSprop, ε 1e-7) names none.
UPDATE_RULE = "tf1"

EPSILONS = {"adam": 1e-8, "rmsprop": 1e-10, "sgd": None}


class TF1Adam(keras.optimizers.Optimizer):
    """`tf.compat.v1.train.AdamOptimizer`'s update: m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g²
    (both from 0), w ← w − lr·√(1 − β2^t)/(1 − β1^t)·m/(√v + ε) at step t (from 1). The slots come
    in the order of Keras' Adam, so a checkpoint of Keras' Adam loads into this optimizer."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 name="tf1_adam", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def build(self, var_list):
        """Create the first- and second-moment slots (zeros) of `var_list`."""
        if self.built:
            return
        super().build(var_list)
        self._firsts, self._seconds = self.add_optimizer_variables(var_list, ["momentum", "velocity"])

    def update_step(self, gradient, variable, learning_rate):
        """One TF1 Adam update of `variable` by `gradient`."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        correction = (ops.sqrt(1.0 - ops.power(ops.convert_to_tensor(self.beta_2, dtype), t))
                      / (1.0 - ops.power(ops.convert_to_tensor(self.beta_1, dtype), t)))
        m, v = self._firsts[index], self._seconds[index]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * g)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * ops.square(g))
        self.assign_sub(variable, lr * correction * m / (ops.sqrt(v) + self.epsilon))

    def get_config(self):
        """The constructor's arguments."""
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon}


class TF1RMSProp(keras.optimizers.Optimizer):
    """`tf.compat.v1.train.RMSPropOptimizer`'s update, centered or not.

    ms ← ρ·ms + (1 − ρ)·g², starting at 1; with `centered`, mg ← ρ·mg + (1 − ρ)·g, starting at 0,
    and the denominator is ms − mg² + ε (ms + ε otherwise); mom ← momentum·mom + lr·g/√denominator;
    the variable moves by −mom. With momentum 0, mom is just the step and TF1's slot for it holds
    nothing the next step reads, so the slot is kept only for momentum > 0. The slots come in the
    order of Keras' RMSprop (mean square, momentum, mean gradient), so a checkpoint of Keras'
    RMSprop loads into this optimizer.
    """

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-10, centered=False,
                 name="tf1_rmsprop", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho, self.momentum, self.epsilon, self.centered = rho, momentum, epsilon, centered

    def build(self, var_list):
        """Create the mean-square (ones), momentum and mean-gradient (zeros) slots of `var_list`."""
        if self.built:
            return
        super().build(var_list)
        self._mean_squares = self.add_optimizer_variables(var_list, "mean_square", initializer="ones")
        self._moms = self.add_optimizer_variables(var_list, "momentum") if self.momentum > 0 else []
        self._mean_grads = (self.add_optimizer_variables(var_list, "mean_gradient")
                            if self.centered else [])

    def update_step(self, gradient, variable, learning_rate):
        """One TF1 RMSProp update of `variable` by `gradient`."""
        index = self._get_variable_index(variable)
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        ms = self._mean_squares[index]
        self.assign(ms, self.rho * ms + (1.0 - self.rho) * ops.square(g))
        denominator = ms + self.epsilon
        if self.centered:
            mg = self._mean_grads[index]
            self.assign(mg, self.rho * mg + (1.0 - self.rho) * g)
            denominator = ms - ops.square(mg) + self.epsilon
        step = lr * g / ops.sqrt(denominator)
        if self.momentum > 0:
            mom = self._moms[index]
            self.assign(mom, self.momentum * mom + step)
            step = mom
        self.assign_sub(variable, step)

    def get_config(self):
        """The constructor's arguments."""
        return {**super().get_config(), "rho": self.rho, "momentum": self.momentum,
                "epsilon": self.epsilon, "centered": self.centered}


def make_optimizer(name, learning_rate, momentum=0.0, global_clipnorm=None):
    """The TF1 optimizer `name` (adam, rmsprop: centered, sgd: with momentum) at `learning_rate`.

    `global_clipnorm` clips the gradients it applies to that global norm (None: unclipped).
    """
    if name == "adam":  # tf.compat.v1.train.AdamOptimizer: β1 0.9, β2 0.999, ε 1e-8
        return TF1Adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=EPSILONS["adam"],
                       global_clipnorm=global_clipnorm)
    if name == "rmsprop":  # tf.compat.v1.train.RMSPropOptimizer(centered=True): decay 0.9
        return TF1RMSProp(learning_rate, rho=0.9, momentum=momentum, epsilon=EPSILONS["rmsprop"],
                          centered=True, global_clipnorm=global_clipnorm)
    if name == "sgd":  # MomentumOptimizer's accum ← m·accum + g, var −= lr·accum is Keras' SGD
        return keras.optimizers.SGD(learning_rate, momentum=momentum,
                                    global_clipnorm=global_clipnorm)
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_record(name):
    """What the saved run settings hold of optimizer `name`: its name, ε and update rule."""
    return {"optimizer": name, "epsilon": EPSILONS[name], "update_rule": UPDATE_RULE}
