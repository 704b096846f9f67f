"""Federation: Flower coordinator and clients, aggregation of replicas, reassembly."""
