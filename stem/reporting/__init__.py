"""Results as people read them: tables rebuilt from run directories (`tables`), figures (`plots`), the
paper's names for methods and metrics (`display`), a sweep's provenance line. tables uses plots, never
the other way round."""
