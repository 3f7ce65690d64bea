"""A Keras client as a Flower tutorial writes it, with only the import changed: a Flower
user's existing client runs on fedhive as it is.

    python examples/keras/tutorial_client.py HOST:PORT PARTITION_ID NUM_PARTITIONS INITIAL.npz

against a server that holds no model (``fedhive server --insecure``, which takes the
initial weights from a client's ``get_parameters``). The client class and the
``start_numpy_client`` call are the tutorial's (``import flwr as fl`` became ``import
fedhive as fl``, and TensorFlow's Keras is Keras 3 on the PyTorch backend); around them:
a model, this site's share of scikit-learn's digits, and the model's initial weights
saved to INITIAL.npz, so that one can tell how much the federation improved it. The
class has no ``evaluate``: the client says so once, and the server counts it per round.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 without TensorFlow

import keras as tf  # the tutorial's `import tensorflow as tf`
import numpy as np

import fedhive as fl
from fedhive.data import iid, load_digits

address, partition_id, num_partitions, initial_path = sys.argv[1:5]
tf.utils.set_random_seed(int(partition_id))
data = load_digits(seed=0)
mine = iid(len(data.y_train), int(num_partitions), seed=0).indices[int(partition_id)]
x_train, y_train = data.x_train[mine], data.y_train[mine]
model = tf.Sequential(
    [
        tf.Input(shape=(64,)),
        tf.layers.Dense(64, activation="relu"),  # as examples/keras/client.py
        tf.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
np.savez(initial_path, *model.get_weights())


# --- the tutorial's client, unchanged ---------------------------------------------------
# Define client
class FlowerClient(fl.client.NumPyClient):
    def __init__(self, model, x_train, y_train):
        self.model = model
        self.x_train = x_train
        self.y_train = y_train

    def get_parameters(self, config):
        return self.model.get_weights()

    def fit(self, parameters, config):
        self.model.set_weights(parameters)
        self.model.fit(self.x_train, self.y_train, epochs=1)
        return self.model.get_weights(), len(self.x_train), {}


# Start client
fl.client.start_numpy_client(server_address=address, client=FlowerClient(model, x_train, y_train))
