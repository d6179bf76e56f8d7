"""The booster box runtime: rules, classifier, controller (boxd), booster library and engines."""
