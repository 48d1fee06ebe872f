//! RabbitMQ: the only module that knows lapin.
