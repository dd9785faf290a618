"""tf.data input (TensorFlow only): feature specs, preprocessing ops, tokenizer, datasets.

Installed as ``keras_mm.pipelines``. Never imports the Keras model code.
"""
