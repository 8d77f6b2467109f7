# Fails the build when an AVX2-compiled kernel object defines a weak symbol outside its
# own namespace. The kernel sources are compiled twice (baseline and AVX2); a weak
# definition (an inline or template function from a header) appears in both copies and
# the linker keeps one of them, so an AVX2 copy could run on a CPU without AVX2.
# Usage: cmake -DNM=<nm> -DOBJECTS=<a;b;...> -P check_isa_symbols.cmake
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} -C --defined-only ${object} OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_isa_symbols: ${NM} failed on ${object}")
  endif()
  string(REPLACE "\n" ";" lines "${symbols}")
  set(leaked "")
  foreach(line IN LISTS lines)
    if(line MATCHES "^[0-9a-fA-F]+ [WVu] (.*)$")
      set(name "${CMAKE_MATCH_1}")
      if(NOT name MATCHES "conveyor::kernels::avx2" AND NOT name MATCHES "^DW\\.ref\\.")
        list(APPEND leaked "${name}")
      endif()
    endif()
  endforeach()
  if(leaked)
    list(JOIN leaked "\n  " leaked_lines)
    message(FATAL_ERROR "AVX2 kernel object ${object} defines weak symbols that the baseline path could "
                        "end up calling:\n  ${leaked_lines}\nKeep header code (std:: templates, inline "
                        "functions) out of cpp/src/kernels/cpu/*.cpp, or give it internal linkage.")
  endif()
endforeach()
