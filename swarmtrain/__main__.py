from swarmtrain.cli import main

main(prog_name="swarmtrain")
