"""The bundled study configs (YAML), shipped as package data: `rbm-study launch quick` finds quick.yaml here."""
