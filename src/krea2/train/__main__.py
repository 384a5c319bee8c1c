from krea2.train.cli import main

main()
