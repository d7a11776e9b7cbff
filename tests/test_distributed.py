"""distributed.py on one process (the 2-process path runs in tests/test_sample_ddp.py through sample_ddp.py)."""
import distributed


def test_one_process_is_rank_zero_of_one(capsys):
    state = distributed.init()
    assert state is not None and distributed.init().process_index == state.process_index
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.gather_object([1, 2]) == [[1, 2]]  # a list is one object, not flattened
    distributed.barrier()
    distributed.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    distributed.shutdown()
