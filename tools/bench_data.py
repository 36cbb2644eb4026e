from mnapps.cli.bench_data import main
if __name__ == "__main__": main()
