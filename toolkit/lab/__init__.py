"""The live Hadoop lab: a real HDFS cluster on this machine, a workload, scheduled faults, and
logwarden watching it (issue 16).

    cluster    NameNode + DataNodes as separate JVMs from Maven Central jars (hadoop/pom.xml);
               `logwarden lab up|down|status` (make lab-up / lab-down)
    relay      the TCP link between HDFS clients and the NameNode's client RPC port, which the
               "cut the NameNode's client traffic" fault drops
    workload   a seeded, steady stream of WebHDFS writes, reads, appends and deletes
    faults     fault kinds (each a real action on the running cluster), schedules, the injector
    scrape     the daemons' /prom endpoints -> samples, per host, every 10 s
    record     `logwarden lab record`: a labelled data set in TrainTicket's layout
    live       `make lab`: the cluster watched live by logwarden's stages, with a final table
"""


def main(args) -> int:
    """`logwarden lab up|down|status|fetch|record|live`: the module of each action does the work."""
    from services.settings import UsageError
    from toolkit.lab.cluster import LabError

    try:
        if args.action == "record":
            from toolkit.lab import record
            return record.main(args)
        if args.action == "live":
            from toolkit.lab import live
            return live.main(args)
        from toolkit.lab import cluster
        return cluster.main(args)
    except LabError as err:
        raise UsageError(str(err)) from None
