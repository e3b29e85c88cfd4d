"""The reproduction wing: the paper's data, models and experiments (`batchnorm reproduce ...`).

Nothing in the library wing (`batchnorm.functional`, `batchnorm.modules`, ...) imports this
package; it uses only the library's public names.
"""
